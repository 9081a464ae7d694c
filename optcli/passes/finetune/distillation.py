"""Distillation: the soft-target loss (Hinton et al., 2015) mixed with the task loss, and hidden-feature matching
(student features caught by forward hooks, projected to the teacher's width where they differ)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from optcli.errors import BadInput
from optcli.passes.finetune.job import first_output, set_eval_mode
from optcli.textdata import IGNORE_INDEX


class Distiller(nn.Module):
    """The student plus what distillation trains with it: projections from student to teacher feature widths.

    forward(*inputs) -> (logits, [student feature projected to the teacher's width, ...]). Features are
    caught by forward hooks on the named submodules; one wrapper module keeps DDP and checkpoints simple.
    """

    def __init__(
        self, student: nn.Module, features: list, teacher_widths: dict[str, int], student_widths: dict[str, int]
    ):
        super().__init__()
        self.student = student
        self.features = [(f.student, f.teacher, f.weight) for f in features]
        self.projections = nn.ModuleDict()
        for s_name, t_name, _ in self.features:
            s_w, t_w = student_widths[s_name], teacher_widths[t_name]
            if s_w != t_w:  # learned 1x1 projection (a Linear over the width axis) when widths differ
                self.projections[_key(s_name)] = nn.Linear(s_w, t_w, bias=False)
        self._caught: dict[str, torch.Tensor] = {}
        modules = dict(student.named_modules())
        self._hooks = [
            modules[s_name].register_forward_hook(_catcher(self._caught, s_name)) for s_name, _, _ in self.features
        ]

    def release(self) -> None:
        """Take the feature hooks off the student, which lives on after training."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def forward(self, *inputs):
        self._caught.clear()
        logits = first_output(self.student(*inputs))
        feats = []
        for s_name, _, _ in self.features:
            f = self._caught[s_name]
            if _key(s_name) in self.projections:
                f = _width_last(self.projections[_key(s_name)], f)
            feats.append(f)
        return logits, feats


def _key(name: str) -> str:
    return name.replace(".", "__") or "root"


def _catcher(store: dict, name: str):
    def hook(module, args, output):
        store[name] = first_output(output)

    return hook


def _width_axis(t: torch.Tensor) -> int:
    # Conv maps are (N, C, H, W[, D]): width is C. Everything else (N, D) or (N, L, D): the last axis.
    return 1 if t.ndim >= 4 else t.ndim - 1


def _width_last(linear: nn.Module, t: torch.Tensor) -> torch.Tensor:  # an nn.Linear from a ModuleDict
    axis = _width_axis(t)
    return linear(t.movedim(axis, -1)).movedim(-1, axis)


def probe_features(module: nn.Module, names: list[str], inputs: tuple, role: str) -> dict[str, torch.Tensor]:
    """Run one batch and catch the named submodules' outputs (to size projections and check shapes)."""
    modules = dict(module.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        some = [n for n in modules if n][:8]
        raise BadInput(
            f"distill.features: the {role} has no module {missing[0]!r} (module names look like: {', '.join(some)})"
        )
    caught: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(_catcher(caught, n)) for n in names]
    try:
        with torch.no_grad():
            out = first_output(module(*inputs))
    finally:
        for h in handles:
            h.remove()
    lost = [n for n in names if n not in caught]
    if lost:
        raise BadInput(
            f"distill.features: the {role}'s module {lost[0]!r} never ran as a module (a torch.export graph inlines its "
            "submodules); give that model as a state_dict + factory to match hidden features"
        )
    return {"__output__": out, **caught}


def feature_widths(student: nn.Module, teacher: nn.Module, features: list, example: tuple) -> tuple[dict, dict]:
    """Widths of the matched student and teacher features, from one batch; only the width may differ."""
    set_eval_mode(student)  # probing must not move BatchNorm statistics
    s_caught = probe_features(student, [f.student for f in features], example, "student")
    t_caught = probe_features(teacher, [f.teacher for f in features], example, "teacher")
    s_widths, t_widths = {}, {}
    for f in features:
        s, t = s_caught[f.student], t_caught[f.teacher]
        a_s, a_t = _width_axis(s), _width_axis(t)
        if s.ndim != t.ndim or [d for i, d in enumerate(s.shape) if i != a_s] != [
            d for i, d in enumerate(t.shape) if i != a_t
        ]:
            raise BadInput(
                f"distill.features: student {f.student!r} gives {tuple(s.shape)}, teacher {f.teacher!r} gives {tuple(t.shape)}; "
                "only the width (channels / last axis) may differ"
            )
        s_widths[f.student], t_widths[f.teacher] = s.shape[a_s], t.shape[a_t]
    return s_widths, t_widths


def distillation_loss(logits, teacher_logits, labels, temperature: float, alpha: float):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)  (Hinton et al., 2015).

    F.kl_div(log q_student, log p_teacher) is KL(p_teacher || q_student); T^2 keeps the soft term's
    gradients on the scale of the hard one. Without labels the loss is the soft term alone.
    """
    t = temperature
    soft = (
        F.kl_div(
            F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1), reduction="batchmean", log_target=True
        )
        * t
        * t
    )
    if labels is None:
        return soft
    return alpha * soft + (1 - alpha) * task_loss(logits, labels)


def task_loss(logits, labels):
    if labels.dtype.is_floating_point:  # regression targets
        return F.mse_loss(logits.reshape(labels.shape), labels)
    if logits.ndim == labels.ndim + 1 and logits.ndim > 2:  # per-token labels (token classification)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, labels)
