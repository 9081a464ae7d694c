"""torch.onnx.export(dynamo=True) rebuilds onnxscript's table of ~500 torchlib functions on every call, reading each
function's source with `inspect` (1-2 s: more than a small model's whole export). The table depends on nothing but the
installed onnxscript, so a process that exports many models (a study's worker, the API in a loop, the test suite)
builds it once. Scoped to the export: the library's own function is back in place when the block ends."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

NAME = "get_torchlib_ops"


@functools.cache
def _table(build: Callable[[], list]) -> list:
    return build()


@contextlib.contextmanager
def torchlib_table_built_once() -> Iterator[None]:
    try:
        from torch.onnx._internal.exporter import _registration

        apis = _registration.onnxscript_apis
        build = getattr(apis, NAME)
    except (ImportError, AttributeError):  # another torch lays this out differently: its own (slower) behaviour
        yield
        return
    own = NAME in vars(apis)  # a lazily imported module's proxy holds no attribute of its own until set
    setattr(apis, NAME, functools.partial(_table, build))
    try:
        yield
    finally:
        if own:
            setattr(apis, NAME, build)
        else:
            delattr(apis, NAME)
