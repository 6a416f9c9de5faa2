"""``bpgpu demo`` end to end: the command trains on digits, reaches 0.97 and writes a PNG."""

import re
import struct
import subprocess
import sys
import zlib

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import bpgpu as bp  # noqa: E402
from bpgpu import cli  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature and the chunk CRC."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert zlib.crc32(kind + body) == crc, "IHDR CRC mismatch"
    assert data.endswith(b"IEND\xaeB`\x82"), "PNG does not end with IEND"
    return struct.unpack(">II", body[:8])


@pytest.mark.slow
def test_demo_reaches_097_and_writes_the_loss_curve(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    match = re.search(r"test accuracy: ([0-9.]+)", printed.out)
    assert match, printed.out
    assert float(match.group(1)) >= 0.97
    # the progress bar (tqdm, on stderr) ran through the epochs
    assert "100/100" in printed.err
    png = out / "loss_curve.png"
    assert f"loss curve: {png}" in printed.out
    width, height = _png_size(png.read_bytes())
    assert (width, height) == (600, 400)


@pytest.mark.skipif(bp.gpu_status().usable, reason="checks the refusal on a machine without a usable GPU")
def test_demo_on_a_machine_without_gpu_says_why(tmp_path):
    with pytest.raises(SystemExit, match="asks for the GPU, but CuPy cannot run here"):
        cli.main(["demo", "--out", str(tmp_path), "--device", "gpu"])


def test_demo_without_sklearn_names_the_extra():
    code = (
        "import sys\n"
        "sys.modules['sklearn'] = None  # as if it were not installed\n"
        "from bpgpu import cli\n"
        "cli.main(['demo'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1 and "pip install 'bpgpu[sklearn]'" in done.stderr, done.stderr
