"""Data sources -> arrays keyed by model input name, batched with a fixed seed."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optcli.artifact import build_from_factory
from optcli.errors import BadInput
from optcli.model import InputSpec, readable_shape, spec_shape

LABEL_KEYS = ("labels", "label", "y", "target", "targets")


@dataclass
class Dataset:
    name: str  # calibration | eval | train
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    batch_size: int
    metric: str
    shuffle: bool = False
    seed: int = 0
    # Inputs with no batch axis (a fixed shape such as [5]) whose samples are stacked on a new first axis:
    # they are fed one whole sample at a time, as the model takes them.
    unbatched: frozenset[str] = frozenset()
    where: str = ""  # "data.eval (test.npz)": what a message about this data names
    label_key: str | None = None
    # The axis each array holds its samples on where it is not 0 (a state: layers x n x hidden); None: an input
    # without batch axis stored once (a sample rate as a 0-d array), fed whole with every batch.
    axes: dict[str, int | None] = field(default_factory=dict)

    def __len__(self) -> int:
        for k, v in self.arrays.items():
            axis = self.axes.get(k, 0)
            if axis is not None:
                return v.shape[axis]
        return 1

    def _take(self, key: str, v: np.ndarray, idx) -> np.ndarray:
        axis = self.axes.get(key, 0)
        return v if axis is None else np.take(v, idx, axis=axis)

    def batches(
        self, batch_size: int | None = None, limit: int | None = None, epoch: int = 0
    ) -> Iterator[tuple[dict, np.ndarray | None]]:
        n = min(len(self), limit) if limit else len(self)
        order = np.arange(len(self))
        if self.shuffle:
            order = np.random.default_rng(self.seed + epoch).permutation(len(self))
        order = order[:n]
        size = 1 if self.unbatched else batch_size or self.batch_size
        for start in range(0, n, size):
            idx = order[start : start + size]
            feeds = {k: v[idx][0] if k in self.unbatched else self._take(k, v, idx) for k, v in self.arrays.items()}
            yield feeds, (self.labels[idx] if self.labels is not None else None)

    def head(self, n: int) -> dict:
        return {k: self._take(k, v, np.arange(min(n, len(self)))) for k, v in self.arrays.items()}


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return load_file(str(path))
        if suffix in (".pt", ".pth"):
            import torch

            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise BadInput(
                    f"{path}: holds a {type(obj).__name__}; a data .pt must be a dict of tensors keyed by input name"
                )
            return {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in obj.items()}
    except BadInput:
        raise
    except pickle.UnpicklingError:
        raise BadInput(
            f"{path}: holds pickled Python objects, which are never loaded from data files; save a dict of tensors or arrays"
        ) from None
    except Exception as e:
        raise BadInput(
            f"{path}: cannot read data ({type(e).__name__}: {str(e)[:160]}); expected arrays keyed by input name"
        ) from None
    raise BadInput(f"{path}: unknown data format {suffix!r}; use .npz, .pt (dict of tensors) or .safetensors")


def _from_factory(source) -> dict[str, np.ndarray]:
    batches = build_from_factory(source.factory, source.factory_kwargs, "data factory")
    parts: dict[str, list] = {}
    total = 0
    for batch in batches:
        if not isinstance(batch, dict):
            raise BadInput(
                f"data factory {source.factory}: yields {type(batch).__name__}; yield dicts of arrays keyed by input name"
            )
        for k, v in batch.items():
            parts.setdefault(k, []).append(v.numpy() if hasattr(v, "numpy") else np.asarray(v))
        total += len(next(iter(batch.values())))
        if source.samples and total >= source.samples:
            break
    if not parts:
        raise BadInput(f"data factory {source.factory}: yielded no batches")
    return {k: np.concatenate(v) for k, v in parts.items()}


def load_dataset(name: str, source, inputs: list[InputSpec], model=None) -> Dataset:
    """`model` (the loaded original) gives text sources their tokenizer folder and task."""
    where = f"data.{name} ({source.path or source.factory or source.text})"
    metric = source.metric
    try:
        if source.text is not None:
            from optcli.textdata import load_text

            arrays, text_labels = load_text(source, inputs, model, where)
            if getattr(model, "task", "") == "causal-lm" and "metric" not in source.model_fields_set:
                metric = "perplexity"
        else:
            arrays = read_arrays(Path(source.path)) if source.path is not None else _from_factory(source)
    except BadInput as e:  # text errors name the source already (`where`)
        raise BadInput(str(e) if str(e).startswith(f"data.{name} ") else f"data.{name}: {e}") from None
    if source.text is not None:
        label_key = "labels" if text_labels is not None else None
        arrays = {**arrays, **({"labels": text_labels} if text_labels is not None else {})}
    else:
        label_key = source.labels or next(
            (k for k in LABEL_KEYS if k in arrays and k not in {i.name for i in inputs}), None
        )
    if source.labels and source.text is None and source.labels not in arrays:
        raise BadInput(f"{where}: no labels key {source.labels!r} (keys: {', '.join(arrays)})")
    missing = [i.name for i in inputs if i.name not in arrays and i.value is None]
    if missing:
        raise BadInput(
            f"{where}: no array for model input(s) {', '.join(missing)} (keys: {', '.join(arrays)}); key arrays by input name"
        )
    feeds = {}
    n = None
    unbatched = set()
    axes: dict[str, int | None] = {}
    for spec in inputs:
        if spec.name not in arrays:  # the recipe's value (a sample rate), fed with every batch
            feeds[spec.name], axes[spec.name] = np.asarray(spec.value, dtype=_want(spec)), None
            continue
        arr = arrays[spec.name]
        axis = spec.batch_axis
        if arr.shape == tuple(spec.shape) and (axis is None or (axis != 0 and not spec.batch_dynamic)):
            # stored once: a 0-d sample rate, the one initial state of a recurrent model
            feeds[spec.name], axes[spec.name] = _cast(arr, spec, where), None
            continue
        if axis is None and not spec.shape:
            raise BadInput(
                f"{where}: {spec.name!r} has shape {readable_shape(arr.shape)}, but the model takes a scalar, fed "
                f"the same with every batch: store it as a 0-d array (np.array({spec.name}))"
            )
        fixed = [
            (arr.shape[a], d)
            for a, d in enumerate(spec.shape)
            if a < arr.ndim and a != axis and a not in spec.dynamic_axes
        ]
        if spec.shape and not spec.batch_dynamic and axis in (0, None) and arr.shape[1:] == tuple(spec.shape):
            unbatched.add(spec.name)  # samples of a batch-less input, stacked: fed one at a time
        elif (
            spec.shape
            and not spec.batch_dynamic
            and axis in (0, None)
            and arr.shape != tuple(spec.shape)
            and (arr.ndim != len(spec.shape) or arr.shape[1:] != tuple(spec.shape[1:]))
        ):
            dims, have = readable_shape(spec.shape), readable_shape(arr.shape)
            raise BadInput(
                f"{where}: {spec.name!r} has shape {have}, but the model takes exactly {dims} (no free batch axis): "
                f"store one sample as {dims}, or many stacked on a new first axis as n x {dims}"
            )
        elif spec.shape and (arr.ndim != len(spec.shape) or any(a != s for a, s in fixed)):
            raise BadInput(
                f"{where}: {spec.name!r} has shape {readable_shape(arr.shape)}, the model takes {spec_shape(spec)}"
                + layout_hint(arr.shape, spec.shape)
            )
        feeds[spec.name] = _cast(arr, spec, where)
        if axis not in (0, None) and spec.name not in unbatched:
            axes[spec.name] = axis
        length = arr.shape[axes.get(spec.name) or 0] if arr.ndim else None  # set above only to an int
        if n is not None and length is not None and length != n:
            raise BadInput(f"{where}: arrays have different lengths ({n} vs {length} for {spec.name!r})")
        n = length if length is not None else n
    labels = arrays.get(label_key) if label_key else None
    if labels is not None and n is not None and len(labels) != n:
        raise BadInput(f"{where}: {len(labels)} labels for {n} samples")
    if n == 0:
        raise BadInput(f"{where}: holds no samples")
    if source.take is not None and n:
        lo, hi = (round(f * n) for f in source.take)  # the same rounding on both sides: [0, .5] + [.5, 1] split exactly
        if hi <= lo:
            raise BadInput(f"{where}: take {list(source.take)} of {n} samples leaves none; widen it")
        feeds = {
            k: np.take(v, np.arange(lo, hi), axis=axes.get(k, 0)) if v.ndim and axes.get(k, 0) is not None else v
            for k, v in feeds.items()
        }
        labels = labels[lo:hi] if labels is not None else None
        n = hi - lo  # what `samples` below counts from
    if source.samples:
        keep = np.arange(min(source.samples, n or 0))
        feeds = {
            k: np.take(v, keep, axis=axes.get(k, 0)) if v.ndim and axes.get(k, 0) is not None else v
            for k, v in feeds.items()
        }
        labels = labels[: source.samples] if labels is not None else None
    if labels is not None and name == "eval":
        check_label_values(labels, metric, f"{where}: labels {label_key!r}")
    dataset = Dataset(name, feeds, labels, source.batch_size, metric, source.shuffle, source.seed, frozenset(unbatched))
    dataset.where, dataset.label_key, dataset.axes = where, label_key, axes
    return dataset


CLASS_METRICS = ("accuracy", "top5")


def check_label_values(labels: np.ndarray, metric: str, what: str) -> None:
    """Labels a class metric cannot score, refused when the data is read: probabilities / one-hot rows, not indices."""
    if metric not in CLASS_METRICS:
        return
    if labels.dtype.kind not in "iub" and not (labels.dtype.kind == "f" and np.array_equal(labels, np.round(labels))):
        fix = "labels.argmax(-1)" if labels.ndim >= 2 else "integer class indices"
        raise BadInput(
            f"{what} holds {labels.dtype} values of shape {readable_shape(labels.shape)}, not class indices: "
            f"{metric} compares the model's argmax with one class index per sample; store {fix} "
            "(or set data.eval.metric: mse for regression targets)"
        )


def check_labels_fit(labels: np.ndarray, output: tuple, metric: str, what: str) -> None:
    """Refuse (exit 2) labels that do not fit the model's first output (`output`: its shape without the batch,
    None where the model leaves a size free): the data file, both shapes and the fix in one line."""
    have = tuple(labels.shape[1:])
    shown = f"labels of shape {readable_shape(labels.shape)} for outputs of shape {readable_shape(('n', *output))}"
    if metric in CLASS_METRICS and output:
        classes, per_sample = output[-1], tuple(output[:-1])
        if len(have) == len(per_sample) + 1 and have[-1] in (classes, None) and have[-1] != 1:
            raise BadInput(
                f"{what}: {shown} look one-hot; {metric} needs one class index per sample: store labels.argmax(-1)"
            )
        if have == (1,) and not per_sample:
            raise BadInput(f"{what}: {shown}; {metric} needs one class index per sample: store labels.reshape(-1)")
        if len(have) != len(per_sample) or any(a != b for a, b in zip(have, per_sample, strict=True) if b is not None):
            want = readable_shape(("n", *per_sample))
            raise BadInput(f"{what}: {shown}; {metric} needs one class index per output position, shape {want}")
        from optcli.textdata import IGNORE_INDEX

        counted = labels[labels != IGNORE_INDEX]  # per-token labels: padding and later sub-words are not scored
        if isinstance(classes, int) and counted.size and (counted.max() >= classes or counted.min() < 0):
            raise BadInput(
                f"{what}: labels go from {counted.min():g} to {counted.max():g} but the model's first output has "
                f"{classes} classes (0..{classes - 1}): check that the labels belong to this model"
            )
        if metric == "top5" and isinstance(classes, int) and classes < 5:
            raise BadInput(
                f"{what}: top5 needs at least 5 classes; the model's first output has {classes}: use accuracy"
            )
    if metric == "mse" and None not in output:
        have_n, want_n = int(np.prod(have, dtype=np.int64)), int(np.prod(output, dtype=np.int64))
        if have_n != want_n:
            raise BadInput(
                f"{what}: {shown}; mse compares them element by element: store targets shaped like the outputs"
            )


def layout_hint(have: tuple, want: tuple) -> str:
    """ "; looks like NHWC: transpose(0, 3, 1, 2)" when the array holds the model's axes in another order."""
    if len(have) != len(want) or len(have) < 3 or sorted(have[1:]) != sorted(d for d in want[1:] if isinstance(d, int)):
        return ""
    if len(have) == 4 and tuple(have[1:]) == (want[2], want[3], want[1]):
        return "; looks like NHWC (channels last): convert with arr.transpose(0, 3, 1, 2)"
    if len(have) == 4 and tuple(have[1:]) == (want[3], want[1], want[2]):
        return "; looks like NCHW for an NHWC model: convert with arr.transpose(0, 2, 3, 1)"
    return "; the same sizes in another order: transpose the array to the model's axis order"


def _want(spec: InputSpec) -> np.dtype:
    return np.dtype("float32" if spec.dtype == "bfloat16" else spec.dtype)


def _cast(arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    want = _want(spec)
    if arr.dtype == want:
        return arr
    same_kind = (arr.dtype.kind == "f") == (want.kind == "f")
    if not same_kind:
        raise BadInput(f"{where}: {spec.name!r} is {arr.dtype}, the model takes {spec.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise BadInput(f"{where}: {spec.name!r} holds NaN or inf values")
    return arr.astype(want)


def text_length(spec) -> int | None:
    """The token length of the recipe's text data (eval first): the example shape a text model is measured at."""
    for name in ("eval", "calibration", "train"):
        source = getattr(spec, name)
        if source is not None and source.text is not None:
            return source.max_length
    return None


class DataCatalog:
    """The recipe's data sections, each read once on first use."""

    def __init__(self, spec, inputs: list[InputSpec], model=None):
        self._spec = spec
        self._inputs = inputs
        self._model = model  # the loaded original: text sources read its folder's tokenizer
        self._cache: dict[str, Dataset | None] = {}

    def get(self, name: str) -> Dataset | None:
        if name not in self._cache:
            source = getattr(self._spec, name)
            self._cache[name] = load_dataset(name, source, self._inputs, self._model) if source is not None else None
        return self._cache[name]

    @property
    def calibration(self) -> Dataset | None:
        return self.get("calibration")

    @property
    def eval(self) -> Dataset | None:
        return self.get("eval")

    @property
    def train(self) -> Dataset | None:
        return self.get("train")
