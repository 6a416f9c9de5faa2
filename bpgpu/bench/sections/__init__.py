"""The sections of ``bpgpu bench``, in the order they run and print.

To add one: a module here with a ``SECTION = Section(...)`` (see
:mod:`bpgpu.bench.section`), and one line below.
"""

from __future__ import annotations

from ..section import Section
from . import derivatives, gradient_cost, levenberg_marquardt, train_step

SECTIONS: dict[str, Section] = {
    s.key: s for s in (gradient_cost.SECTION, train_step.SECTION, levenberg_marquardt.SECTION, derivatives.SECTION)
}
