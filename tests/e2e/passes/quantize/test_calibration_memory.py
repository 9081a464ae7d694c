"""Static int8 calibration in bounded memory: batches made one at a time, ORT's calibrator fed chunk by chunk.

A search over a third-party CNN used to swing between 1 and 14 GB: every calibration batch was held in a list, and ORT's
entropy/percentile calibrators keep every float tensor of every batch they are given until they histogram them.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from optcli.passes.base import Context
from optcli.passes.quantize import _calibration_batches, calibration_batch_size
from optcli.passes.quantize import ort as qort
from optcli.passes.quantize.config import Config

SAMPLES = 24


def conv_model(path: Path, channels: int = 8, size: int = 16) -> Path:
    """Conv -> Relu -> Conv on a free batch: activations much bigger than the input, like any CNN."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((channels, channels, 3, 3)) * 0.2).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", channels, size, size])],
        [w1, w2],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def ramp_data(n: int = SAMPLES, size: int = 16) -> np.ndarray:
    """Sample i scaled by i + 1: the last sample holds every maximum, so a dropped batch changes the ranges."""
    x = np.random.default_rng(1).standard_normal((n, 1, 3, size, size)).astype(np.float32)
    return x * np.arange(1, n + 1, dtype=np.float32)[:, None, None, None, None]


class Tracked:
    """A data source that says how many of its batches are alive at once (made and not yet freed)."""

    def __init__(self, data: np.ndarray):
        self.data, self.alive, self.most_alive, self.made = data, 0, 0, 0

    def _gone(self):
        self.alive -= 1

    def batches(self):
        for x in self.data:
            feeds = {"x": x.copy()}
            self.alive += 1
            self.made += 1
            self.most_alive = max(self.most_alive, self.alive)
            weakref.finalize(feeds["x"], self._gone)
            yield feeds

    def source(self) -> qort.CalibrationBatches:
        return qort.CalibrationBatches(self.batches, len(self.data), len(self.data))


def context(tmp_path: Path) -> Context:
    return Context(recipe=None, step_name="2-quantize", step_dir=tmp_path, reference=None, data=None)


def scales(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith(("_scale", "_zero_point"))}


def write(model: Path, target: Path, batches, method: str, tmp_path: Path) -> dict:
    settings = qort.Settings("static", False, method, op_types=("Conv",))
    config = Config(type="quantize", mode="static", calibration={"method": method})
    return qort.quantize_onnx(model, target, settings, config, batches, None, context(tmp_path), {})


def test_calibration_reader_hands_ort_each_batch_once_chunk_by_chunk():
    source = Tracked(ramp_data(7))
    reader = qort.CalibrationReader(source.source(), chunk=3)
    assert len(reader) == 3  # chunks of 3, 3 and 1 batches: what quantize_static's stride loop walks
    seen = []
    for i in range(len(reader)):
        reader.set_range(start_index=i, end_index=i + 1)
        chunk = list(iter(reader.get_next, None))
        seen.append([float(b["x"].max()) for b in chunk])
    expected = [float(x.max()) for x in source.data]
    assert seen == [expected[:3], expected[3:6], expected[6:]]
    assert source.made == 7  # one pass over the data source, nothing made twice or ahead
    reader.set_range(start_index=1, end_index=2)  # out of order: a new pass, skipping to the chunk
    assert [float(b["x"].max()) for b in iter(reader.get_next, None)] == expected[3:6]


def test_static_int8_never_holds_more_than_the_batch_in_use(tmp_path, monkeypatch):
    model = conv_model(tmp_path / "m.onnx")
    source = Tracked(ramp_data())
    monkeypatch.setattr(qort, "CALIB_CHUNK_BYTES", 1)  # one batch per chunk
    details = write(model, tmp_path / "q.onnx", source.source(), "entropy", tmp_path)
    assert source.made == 2 + SAMPLES  # the inf screen's first two, then one pass of calibration
    assert source.most_alive <= 2, f"{source.most_alive} calibration batches alive at once"
    assert details["calibration_chunks"] == SAMPLES
    from onnxruntime.quantization.calibrate import CalibraterBase

    # Nothing of ORT's calibrator (its session, its collected outputs) outlives the candidate it calibrated.
    assert not [o for o in gc.get_objects() if isinstance(o, CalibraterBase)]


def test_minmax_ranges_are_identical_in_chunks_and_in_one_pass(tmp_path, monkeypatch):
    import onnxruntime.quantization as ortq

    model = conv_model(tmp_path / "m.onnx")
    data = ramp_data()
    asked = []
    real = ortq.quantize_static

    def spy(*args, **kwargs):
        asked.append((dict(kwargs["extra_options"]), len(args[2])))
        return real(*args, **kwargs)

    monkeypatch.setattr(ortq, "quantize_static", spy)
    whole = write(model, tmp_path / "whole.onnx", Tracked(data).source(), "minmax", tmp_path)
    monkeypatch.setattr(qort, "CALIB_CHUNK_BYTES", 1)
    chunked = write(model, tmp_path / "chunked.onnx", Tracked(data).source(), "minmax", tmp_path)
    assert "calibration_chunks" not in whole and "CalibStridedMinMax" not in asked[0][0]
    assert chunked["calibration_chunks"] == SAMPLES
    assert asked[1] == ({**asked[0][0], "CalibStridedMinMax": 1}, SAMPLES)  # the reader walked chunk by chunk
    a, b = scales(tmp_path / "whole.onnx"), scales(tmp_path / "chunked.onnx")
    assert a.keys() == b.keys() and len(a) >= 6
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # The ranges saw every chunk: without the last sample (the largest) the input's scale is smaller.
    write(model, tmp_path / "head.onnx", Tracked(data[:-1]).source(), "minmax", tmp_path)
    assert scales(tmp_path / "head.onnx")["x_scale"] < a["x_scale"]


CHILD = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import optcli.passes.quantize.ort as qort
from test_calibration_memory import Tracked, conv_model, ramp_data, write
tmp, row = Path(sys.argv[2]), sys.argv[3]
model = conv_model(tmp / "m.onnx", channels=32, size=64)
data = ramp_data(48, size=64)
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
# The peak so far (imports, building the model) would hide the calibration's: reset it (clear_refs 5 resets VmHWM).
Path("/proc/self/clear_refs").write_text("5")
start = status("VmRSS")
if row == "plain":
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    batches = iter([{"x": x} for x in data])
    class Reader:
        def get_next(self):
            return next(batches, None)
    quantize_static(str(model), str(tmp / "plain.onnx"), Reader(), op_types_to_quantize=["Conv"],
                    calibrate_method=CalibrationMethod.Entropy)
else:
    qort.CALIB_CHUNK_BYTES = 8 * 2**20  # the default 256 MB would hold this small model's 48 samples in one chunk
    write(model, tmp / "optcli.onnx", Tracked(data).source(), "entropy", tmp)
print(json.dumps({"start": start, "peak": status("VmHWM")}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM and clear_refs are Linux's")
def test_entropy_calibration_memory_does_not_grow_with_every_sample(tmp_path):
    """Side by side, each in its own process: plain quantize_static keeps 48 samples' activations (1.6 MB each) until
    it histograms them; optcli's chunks of 8 MB hold a few samples at a time."""
    growth = {}
    for row in ("plain", "optcli"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(Path(__file__).parent), str(tmp_path), row],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        growth[row] = figures["peak"] - figures["start"]
    assert growth["optcli"] < 0.5 * growth["plain"], growth


def test_large_images_are_calibrated_a_few_per_batch_and_read_lazily():
    big = SimpleNamespace(arrays={"x": np.zeros((4, 3, 320, 320), np.float32)}, batch_size=32)
    small = SimpleNamespace(arrays={"x": np.zeros((4, 1, 8, 8), np.float32)}, batch_size=64)
    assert calibration_batch_size(big, None) == 1  # 1.2 MB a sample: its activations fill GBs at batch 32
    assert calibration_batch_size(small, None) == 32
    assert calibration_batch_size(big, 4) == 4  # a batch the model pins is kept

    from optcli.data import Dataset

    made = []

    class Spy(Dataset):
        def batches(self, batch_size=None, limit=None, epoch=0):
            for feeds, y in super().batches(batch_size, limit, epoch):
                made.append(len(feeds["x"]))
                yield feeds, y

    data = Spy("calibration", {"x": np.zeros((10, 3, 320, 320), np.float32)}, None, 32, "accuracy")
    recipe = SimpleNamespace(data=SimpleNamespace(calibration=SimpleNamespace(samples=7)))
    ctx = SimpleNamespace(data=SimpleNamespace(calibration=data), recipe=recipe, step_name="2-quantize", details={})
    ctx.warn = lambda m: None
    batches = _calibration_batches(SimpleNamespace(inputs=[]), Config(type="quantize", mode="static"), ctx)
    assert made == [] and len(batches) == 7 and batches.samples == 7  # nothing read until the calibrator asks
    assert sum(len(b["x"]) for b in batches) == 7 and made == [1] * 7


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_search_trials_reuse_calibration_ranges_and_write_the_same_model(tmp_path, method):
    """A search's trials that differ only after calibration (exclusions, per-channel) read the ranges file of the
    first instead of calibrating again; the model is the one a fresh calibration writes."""
    model = conv_model(tmp_path / "m.onnx")
    data = ramp_data()
    config = Config(type="quantize", mode="static", calibration={"method": method})
    cache = {"dir": tmp_path / "candidates"}
    cache["dir"].mkdir()
    first = qort.Settings("static", False, method, op_types=("Conv",))
    later = qort.Settings("static", True, method, exclude=frozenset({"conv2"}), op_types=("Conv",))
    qort.quantize_onnx(
        model, tmp_path / "a.onnx", first, config, Tracked(data).source(), None, context(tmp_path), cache=cache
    )
    source = Tracked(data)
    qort.quantize_onnx(model, tmp_path / "b.onnx", later, config, source.source(), None, context(tmp_path), cache=cache)
    assert source.made == 0  # neither the screen nor the calibration read the data again
    assert len(list(cache["dir"].glob("ranges_*.json"))) == 1
    write_fresh = qort.quantize_onnx(
        model, tmp_path / "c.onnx", later, config, Tracked(data).source(), None, context(tmp_path), {}
    )
    assert write_fresh["excluded_nodes"] == ["conv2"]
    b, c = scales(tmp_path / "b.onnx"), scales(tmp_path / "c.onnx")
    assert b.keys() == c.keys()
    for name in b:
        np.testing.assert_array_equal(b[name], c[name], err_msg=name)
