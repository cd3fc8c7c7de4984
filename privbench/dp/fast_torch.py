"""Fast exact DP-SGD for PyTorch: every example's gradient clipped, without
forming per-example gradients where that is the costly part.

One step is one forward pass and one backward pass:

1. forward, with forward hooks keeping each trainable layer's input and output;
2. backward to the layer *outputs* only (``torch.autograd.grad`` with the
   outputs as inputs): parameter gradients are never formed, only each layer's
   output gradient, per example (the mean loss is scaled by the batch size, so
   the output gradient of example i is that of i's own loss);
3. per layer, from the input a and output gradient g, the squared norm of
   every example's gradient of the layer's parameters, by the cheaper exact
   route for the layer's shapes (:data:`RULES`):

   - ``ghost``: Linear and Conv (over the unfolded input), the norm of
     sum_t g_t a_t^T as sum_{t,s} (a_t . a_s)(g_t . g_s), from two T x T Gram
     matrices, when T^2 (d + p) < T d p;
   - ``direct``: the per-example gradient itself, a batched matrix product
     (Linear) or a convolution with the batch folded into the groups (Conv;
     for a depthwise or long convolution, the cross-correlation of input and
     output gradient, at the cost of the ordinary weight gradient);
   - ``segment``: Embedding, the output gradients of equal tokens summed per
     example (only the rows an example uses are formed);
   - ``stored``: LayerNorm, GroupNorm and biases, whose per-example gradients
     are cheap sums;

4. clip factors c_i = min(1, C / ||grad_i||), from the summed squared norms;
5. the clipped sum sum_i c_i grad_i of every parameter without a second
   backward pass ("book-keeping"): it is the ordinary weight gradient of the
   layer with each example's output gradient scaled by c_i, or, where the
   per-example gradients were formed and are no larger than the layer's input,
   their weighted sum.

Layers without a rule, or used in a way a rule does not cover (called twice in
one forward pass, Embedding with ``max_norm``...), fall back to exact general
paths, which :meth:`FastClipper.describe` lists: ``vjp`` (a leaf module's
per-example gradients by ``torch.func`` from its stored input and output
gradient) and ``whole_model`` (per-example gradients of the remaining
parameters by ``torch.func.vmap`` over the whole model, a second forward and
backward pass).

Assumptions, as Opacus' with ``loss_reduction="mean"``: the loss is the mean
over the batch of a per-example loss, and examples do not interact in the
forward pass (no BatchNorm: use GroupNorm). A layer whose output the model
changes in place afterwards (``out += residual``, ``ReLU(inplace=True)``)
is detected and from then on hands the model a copy of its output (listed
as ``dp_copied``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from privbench.training import torch_steps

# The methods, as listed by FastClipper.describe().
GHOST, DIRECT, SEGMENT, STORED = "ghost", "direct", "segment", "stored"
VJP_FALLBACK, WHOLE_MODEL_FALLBACK = "vjp", "whole_model"

_CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                     3: torch.nn.grad.conv3d_weight}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# --------------------------------------------------------------------------- per-layer rules

@dataclass
class _Call:
    """One call of a layer in the forward pass."""

    args: tuple
    output: torch.Tensor
    versions: tuple  # tensor versions at record time, to detect in-place changes


@dataclass
class _Work:
    """A layer's per-example results, from its norm to its clipped sum."""

    sq_norms: torch.Tensor  # (B,)
    per_example: dict = field(default_factory=dict)  # param name -> (B, *shape) kept gradients
    state: dict = field(default_factory=dict)  # what the book-keeping sum needs


class Rule:
    """Per-example squared norms and clipped sums for one layer type.

    ``method`` picks the route from the per-example shapes of one call;
    ``norms`` and ``clipped_sum`` take the layer input ``x`` and output
    gradient ``g`` (batch first, already scaled to per-example losses).
    """

    def unsupported(self, module: nn.Module) -> str | None:
        """Why this rule cannot handle ``module`` (None if it can)."""
        return None

    def method(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> str:
        raise NotImplementedError

    def norms(self, module, x, g, method) -> _Work:
        raise NotImplementedError

    def clipped_sum(self, module, x, g, work: _Work, factors) -> dict[str, torch.Tensor]:
        """Book-keeping sums of the parameters not in ``work.per_example``."""
        return {}


def _weighted_sum(factors: torch.Tensor, per_example: torch.Tensor) -> torch.Tensor:
    return torch.tensordot(factors, per_example, dims=1)


def _scaled(g: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Each example's output gradient times its clip factor."""
    return g * factors.view(-1, *([1] * (g.dim() - 1)))


def _trainable(module: nn.Module, name: str) -> bool:
    param = getattr(module, name, None)
    return isinstance(param, nn.Parameter) and param.requires_grad


def _keep(per_example_numel: int, input_numel: int) -> bool:
    """Whether to keep a layer's per-example gradients for the clipped sum:
    when they take no more memory than the layer input that is held anyway.
    Otherwise the sum is recomputed by book-keeping (one weight-gradient
    product) rather than holding B copies of the weight."""
    return per_example_numel <= input_numel


class LinearRule(Rule):
    """nn.Linear on inputs (B, ..., d): every position t of an example is a
    row of its activations A (T x d) and output gradients G (T x p)."""

    def method(self, module, x, output):
        d, p = module.in_features, module.out_features
        rows = x[0].numel() // d
        ghost_cost = rows * rows * (d + p)
        direct_cost = rows * d * p
        if ghost_cost < direct_cost:
            return GHOST
        return STORED if _keep(d * p, rows * d) else DIRECT

    def norms(self, module, x, g, method):
        batch = x.shape[0]
        a = x.reshape(batch, -1, module.in_features)
        g = g.reshape(batch, -1, module.out_features)
        work = _Work(torch.zeros(batch, dtype=g.dtype, device=g.device), state={"a": a, "g": g})
        if _trainable(module, "weight"):
            if method == GHOST:
                work.sq_norms += _ghost_sq_norms(a, g)
            else:
                per_example = torch.bmm(g.transpose(1, 2), a)  # (B, p, d)
                work.sq_norms += per_example.square().sum(dim=(1, 2))
                if method == STORED:
                    work.per_example["weight"] = per_example
        if _trainable(module, "bias"):
            work.per_example["bias"] = g.sum(dim=1)
            work.sq_norms += work.per_example["bias"].square().sum(dim=1)
        return work

    def clipped_sum(self, module, x, g, work, factors):
        if "weight" in work.per_example or not _trainable(module, "weight"):
            return {}
        a, g = work.state["a"], work.state["g"]
        scaled = _scaled(g, factors)
        return {"weight": scaled.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])}


def _ghost_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||A_i^T G_i||_F^2 = <A_i A_i^T, G_i G_i^T> for a (..., T, d), g (..., T, p),
    summed over every dimension but the first."""
    grams = torch.matmul(a, a.transpose(-1, -2)).mul_(torch.matmul(g, g.transpose(-1, -2)))
    return grams.flatten(1).sum(dim=1)


class ConvRule(Rule):
    """nn.Conv1d/2d/3d, any groups. Costs per example, with L output positions,
    K kernel positions and G groups: direct L K (C_in/G) C_out (the ordinary
    weight gradient's), ghost L^2 (C_in K + C_out) (1-D and 2-D only)."""

    def unsupported(self, module):
        if module.padding_mode != "zeros" and isinstance(module.padding, str):
            return f"padding={module.padding!r} with padding_mode={module.padding_mode!r}"
        return None

    def method(self, module, x, output):
        positions = math.prod(output.shape[2:])
        kernel = math.prod(module.kernel_size)
        c_in, c_out = module.in_channels, module.out_channels
        weight_numel = c_out * (c_in // module.groups) * kernel
        direct_cost = positions * weight_numel
        ghost_cost = positions * positions * (c_in * kernel + c_out)
        if len(module.kernel_size) <= 2 and ghost_cost < direct_cost:
            return GHOST
        return STORED if _keep(weight_numel, x[0].numel()) else DIRECT

    def norms(self, module, x, g, method):
        x, padding = _explicit_padding(module, x)
        work = _Work(torch.zeros(x.shape[0], dtype=g.dtype, device=g.device),
                     state={"x": x, "padding": padding})
        if _trainable(module, "weight"):
            if method == GHOST:
                work.sq_norms += self._ghost_sq_norms(module, x, g, padding)
            else:
                per_example = self._per_example(module, x, g, padding)
                work.sq_norms += per_example.flatten(1).square().sum(dim=1)
                if method == STORED:
                    work.per_example["weight"] = per_example
        if _trainable(module, "bias"):
            work.per_example["bias"] = g.flatten(2).sum(dim=2)
            work.sq_norms += work.per_example["bias"].square().sum(dim=1)
        return work

    def clipped_sum(self, module, x, g, work, factors):
        if "weight" in work.per_example or not _trainable(module, "weight"):
            return {}
        weight_grad = _CONV_WEIGHT_GRAD[len(module.kernel_size)]
        return {"weight": weight_grad(work.state["x"], module.weight.shape, _scaled(g, factors),
                                      module.stride, work.state["padding"], module.dilation,
                                      module.groups)}

    @staticmethod
    def _per_example(module, x, g, padding):
        """(B, C_out, C_in/G, *kernel): the weight gradient with the batch folded
        into the groups."""
        batch, c_in, c_out, groups = x.shape[0], module.in_channels, module.out_channels, module.groups
        spatial = len(module.kernel_size)
        if c_in == groups:
            # Depthwise: each output channel is the cross-correlation of its
            # input channel with its output gradient, a convolution whose
            # weights are the output gradients (stride and dilation swap).
            x = x.repeat_interleave(c_out // c_in, dim=1) if c_out > c_in else x
            out = _CONV[spatial](x.reshape(1, batch * c_out, *x.shape[2:]),
                                 g.reshape(batch * c_out, 1, *g.shape[2:]), padding=padding,
                                 stride=module.dilation, dilation=module.stride,
                                 groups=batch * c_out)
            out = out[(..., *(slice(0, k) for k in module.kernel_size))]
            return out.reshape(batch, c_out, 1, *module.kernel_size)
        weight_grad = _CONV_WEIGHT_GRAD[spatial]
        per_example = weight_grad(x.reshape(1, batch * c_in, *x.shape[2:]),
                                  (batch * c_out, c_in // groups, *module.kernel_size),
                                  g.reshape(1, batch * c_out, *g.shape[2:]), module.stride,
                                  padding, module.dilation, batch * groups)
        return per_example.reshape(batch, c_out, c_in // groups, *module.kernel_size)

    @staticmethod
    def _ghost_sq_norms(module, x, g, padding):
        """Ghost norm over the unfolded input, one row per output position,
        each group its own linear map."""
        batch, groups = x.shape[0], module.groups
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        if len(kernel) == 1:  # as a 2-D convolution of height 1
            x, (kernel, stride, dilation, padding) = x.unsqueeze(2), (
                (1, *kernel), (1, *stride), (1, *dilation), (0, *padding))
        a = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        positions = a.shape[-1]
        a = a.reshape(batch, groups, -1, positions).transpose(2, 3)
        g = g.reshape(batch, groups, -1, positions).transpose(2, 3)
        return _ghost_sq_norms(a, g)


def _explicit_padding(module, x) -> tuple[torch.Tensor, tuple]:
    """The input as the convolution sees it and the zero padding left to it:
    padding modes other than zeros and string paddings are applied to x."""
    spatial = len(module.kernel_size)
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return x, tuple(module.padding)
    if module.padding == "valid":
        return x, (0,) * spatial
    if module.padding == "same":
        pads = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0,) * spatial
    pads = [p for p in reversed(module.padding) for _ in range(2)]
    return F.pad(x, pads, mode=module.padding_mode), (0,) * spatial


class EmbeddingRule(Rule):
    """nn.Embedding: an example's gradient has one row per distinct token it
    uses, the sum of the output gradients at that token's positions."""

    def unsupported(self, module):
        if module.max_norm is not None:
            return "max_norm renormalises the weight in the forward pass"
        if module.scale_grad_by_freq or module.sparse:
            return "scale_grad_by_freq / sparse gradients"
        return None

    def method(self, module, x, output):
        return SEGMENT

    def norms(self, module, x, g, method):
        batch, vocab = x.shape[0], module.num_embeddings
        tokens = x.reshape(batch, -1)
        g = g.reshape(batch, tokens.shape[1], -1)
        if module.padding_idx is not None:
            g = g * (tokens != module.padding_idx).unsqueeze(-1)
        example = torch.arange(batch, device=x.device).unsqueeze(1)
        keys, rows_of_positions = torch.unique((example * vocab + tokens).reshape(-1),
                                               return_inverse=True)
        rows = g.new_zeros(len(keys), g.shape[-1]).index_add_(0, rows_of_positions,
                                                             g.reshape(-1, g.shape[-1]))
        sq_norms = g.new_zeros(batch).index_add_(0, keys // vocab, rows.square().sum(dim=1))
        return _Work(sq_norms, state={"tokens": tokens, "g": g})

    def clipped_sum(self, module, x, g, work, factors):
        tokens, g = work.state["tokens"], work.state["g"]
        scaled = _scaled(g, factors)
        return {"weight": torch.zeros_like(module.weight).index_add_(
            0, tokens.reshape(-1), scaled.reshape(-1, scaled.shape[-1]))}


class _NormRule(Rule):
    """Affine normalisation layers: per example, weight gradient sum(g * x_hat)
    and bias gradient sum(g) over the non-parameter dimensions."""

    def method(self, module, x, output):
        return STORED

    def norms(self, module, x, g, method):
        x_hat = self.normalised(module, x)
        dims = self.reduced_dims(module, x)
        work = _Work(torch.zeros(x.shape[0], dtype=g.dtype, device=g.device))
        if _trainable(module, "weight"):
            work.per_example["weight"] = (g * x_hat).sum(dim=dims) if dims else g * x_hat
        if _trainable(module, "bias"):
            work.per_example["bias"] = g.sum(dim=dims) if dims else g
        for per_example in work.per_example.values():
            work.sq_norms += per_example.flatten(1).square().sum(dim=1)
        return work


class LayerNormRule(_NormRule):
    @staticmethod
    def normalised(module, x):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)

    @staticmethod
    def reduced_dims(module, x):
        return tuple(range(1, x.dim() - len(module.normalized_shape)))


class GroupNormRule(_NormRule):
    @staticmethod
    def normalised(module, x):
        return F.group_norm(x, module.num_groups, eps=module.eps)

    @staticmethod
    def reduced_dims(module, x):
        return tuple(range(2, x.dim()))


# Exact types: a subclass may change the forward pass (add a rule for it).
RULES: dict[type, Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Conv3d: ConvRule(),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
}


# --------------------------------------------------------------------------- the clipper

@dataclass
class _Layer:
    name: str
    module: nn.Module
    params: dict  # direct trainable parameters, name -> Parameter
    rule: Rule | None  # None: a leaf without a rule (per-example vjp)
    calls: list = field(default_factory=list)
    # Set when the model changes the layer's output in place after the layer
    # ran (`out += residual`, ReLU(inplace=True)): the hook then hands the
    # model a copy, keeping the output whose gradient is wanted intact.
    copy_output: bool = False


class FastClipper:
    """Clipped per-example gradient sums of a module's trainable parameters.

    Hooks stay on ``module`` until :meth:`remove`; they record only inside
    :meth:`clipped_grad_sum` and :meth:`describe`.
    """

    def __init__(self, module: nn.Module, max_grad_norm: float):
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r} must be > 0")
        self.module = module
        self.max_grad_norm = float(max_grad_norm)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._layers = self._find_layers(module)
        covered = {id(p) for layer in self._layers for p in layer.params.values()}
        self._whole_model = {name: p for name, p in module.named_parameters()
                             if p.requires_grad and id(p) not in covered}
        self._recording = False
        self._hooks = [layer.module.register_forward_hook(self._recorder(layer))
                       for layer in self._layers]

    @staticmethod
    def _find_layers(module: nn.Module) -> list[_Layer]:
        """Modules whose own trainable parameters a layer rule or the
        per-example vjp can handle: leaves, each parameter owned once."""
        owners: dict[int, int] = {}
        for sub in module.modules():
            for p in sub.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        layers = []
        for name, sub in module.named_modules():
            params = {n: p for n, p in sub.named_parameters(recurse=False) if p.requires_grad}
            if not params or any(True for _ in sub.children()):
                continue
            if any(owners[id(p)] > 1 for p in params.values()):
                continue  # shared (tied) parameters: whole-model fallback
            rule = RULES.get(type(sub))
            if rule is not None and rule.unsupported(sub) is not None:
                rule = None
            layers.append(_Layer(name or type(sub).__name__, sub, params, rule))
        return layers

    def _recorder(self, layer: _Layer):
        def hook(module, args, output):
            if not self._recording:
                return None
            versions = tuple(t._version if isinstance(t, torch.Tensor) else None
                             for t in (*args, output))
            layer.calls.append(_Call(args, output, versions))
            return output.clone() if layer.copy_output else None
        return hook

    def remove(self) -> None:
        """Take the hooks off the module."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # ----------------------------------------------------------------- planning

    def _forward(self, loss_fn, inputs, targets):
        """The loss, with every layer's calls recorded. A layer whose output the
        model then changed in place is marked to be copied, and the forward pass
        run again (once: the marks stay). Inputs changed in place are an error
        (they would break the ordinary backward pass too)."""
        for attempt in range(2):
            for layer in self._layers:
                layer.calls = []
            self._recording = True
            try:
                loss = loss_fn(self.module(*inputs), targets)
            finally:
                self._recording = False
            changed = [(layer, what) for layer in self._layers for call in layer.calls
                       for what in _changed_in_place(call)]
            if not changed:
                return loss
            layer, what = changed[0]
            if what == "inputs" or attempt:
                raise RuntimeError(
                    f"the {what} of layer {layer.name!r} changed in place after the layer ran: "
                    "per-example clipping needs them as they were; make that operation out-of-place")
            for layer, _ in changed:
                layer.copy_output = True
        raise AssertionError("unreachable")

    def _route(self, layer: _Layer) -> str | None:
        """The layer's method for this step; None if it took no part."""
        if not layer.calls:
            return None
        call = layer.calls[0]
        if (layer.rule is not None and len(layer.calls) == 1 and len(call.args) == 1
                and isinstance(call.output, torch.Tensor)):
            return layer.rule.method(layer.module, call.args[0], call.output)
        return VJP_FALLBACK

    def describe(self, loss_fn, inputs, targets) -> dict:
        """The method of every layer for this batch shape (one forward pass)."""
        with torch.no_grad():
            self._forward(loss_fn, inputs, targets)
        layers = [f"{layer.name} ({type(layer.module).__name__}): {self._route(layer) or 'unused'}"
                  for layer in self._layers]
        copied = [layer.name for layer in self._layers if layer.copy_output]
        for layer in self._layers:
            layer.calls = []
        counts: dict[str, int] = {}
        for line in layers:
            method = line.rsplit(": ", 1)[1]
            counts[method] = counts.get(method, 0) + 1
        if self._whole_model:
            counts[WHOLE_MODEL_FALLBACK] = len(self._whole_model)
        return {
            "dp_layers": layers,
            "dp_methods": ", ".join(f"{m} {n}" for m, n in sorted(counts.items())),
            "dp_fallback": [line for line in layers if line.endswith(": " + VJP_FALLBACK)]
            + [f"{name}: {WHOLE_MODEL_FALLBACK}" for name in self._whole_model],
            "dp_copied": copied,
        }

    # ----------------------------------------------------------------- the step

    def clipped_grad_sum(self, loss_fn: Callable, inputs: Sequence[torch.Tensor],
                         targets: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(sum over the batch of the per-example gradients clipped to
        ``max_grad_norm``, one tensor per trainable parameter in
        ``module.parameters()`` order; the mean loss), for a ``loss_fn`` that
        is the mean of a per-example loss."""
        inputs = tuple(inputs)
        batch = len(targets)
        loss = self._forward(loss_fn, inputs, targets)
        taps = [(layer, call) for layer in self._layers for call in layer.calls]
        out_grads = []
        if taps:
            out_grads = torch.autograd.grad(
                loss, [call.output for _, call in taps],
                grad_outputs=torch.full_like(loss, float(batch)), allow_unused=True)
        grads_of = {}
        for (layer, call), g in zip(taps, out_grads):
            grads_of.setdefault(layer.name, []).append(
                torch.zeros_like(call.output) if g is None else g)

        with torch.no_grad():
            sq_norms = torch.zeros(batch, dtype=loss.dtype, device=loss.device)
            pending = []
            for layer in self._layers:
                method = self._route(layer)
                if method is None:
                    continue
                if method == VJP_FALLBACK:
                    per_example = _vjp_per_example(layer, grads_of[layer.name])
                    work = _Work(sum(pe.flatten(1).square().sum(dim=1)
                                     for pe in per_example.values()), per_example=per_example)
                else:
                    x, g = layer.calls[0].args[0], grads_of[layer.name][0]
                    work = layer.rule.norms(layer.module, x, g, method)
                sq_norms += work.sq_norms
                pending.append((layer, method, work))
            whole_model = {}
            if self._whole_model:
                whole_model = _whole_model_per_example(self.module, self._whole_model, loss_fn,
                                                       inputs, targets)
                for per_example in whole_model.values():
                    sq_norms += per_example.flatten(1).square().sum(dim=1)

            factors = self.max_grad_norm / sq_norms.sqrt().clamp(min=self.max_grad_norm)
            sums = {}
            for layer, method, work in pending:
                if method != VJP_FALLBACK:
                    for name, value in layer.rule.clipped_sum(
                            layer.module, layer.calls[0].args[0], grads_of[layer.name][0],
                            work, factors).items():
                        sums[id(layer.params[name])] = value
                for name, per_example in work.per_example.items():
                    sums[id(layer.params[name])] = _weighted_sum(factors, per_example)
            for name, per_example in whole_model.items():
                sums[id(self._whole_model[name])] = _weighted_sum(factors, per_example)
        for layer in self._layers:
            layer.calls = []
        return [sums.get(id(p), torch.zeros_like(p)) for p in self.params], loss.detach()


def _changed_in_place(call: _Call) -> list[str]:
    """What of "inputs" and "output" the model changed in place since the call."""
    *arg_versions, output_version = call.versions
    changed = []
    if any(isinstance(a, torch.Tensor) and a._version != v for a, v in zip(call.args, arg_versions)):
        changed.append("inputs")
    if isinstance(call.output, torch.Tensor) and call.output._version != output_version:
        changed.append("output")
    return changed


def _vjp_per_example(layer: _Layer, out_grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-example gradients of a leaf layer's own parameters, summed over its
    calls: the vjp of the layer on each example's stored input."""
    from torch.func import functional_call, vjp, vmap

    params = {name: p.detach() for name, p in layer.params.items()}
    total: dict[str, torch.Tensor] = {}
    for call, g in zip(layer.calls, out_grads):
        if not all(isinstance(a, torch.Tensor) for a in call.args):
            raise RuntimeError(f"layer {layer.name!r} takes non-tensor arguments: no per-example path")

        def one(args, g_i):
            def f(p):
                return functional_call(layer.module, p, tuple(a.unsqueeze(0) for a in args))

            return vjp(f, params)[1](g_i.unsqueeze(0))[0]

        for name, value in vmap(one)(tuple(call.args), g).items():
            total[name] = total[name] + value if name in total else value
    return total


def _whole_model_per_example(module, params: dict, loss_fn, inputs, targets) -> dict:
    """Per-example gradients of ``params`` (name -> Parameter) by vmap over the
    whole model, each example as a batch of one."""
    from torch.func import functional_call, grad, vmap

    detached = {name: p.detach() for name, p in params.items()}

    def example_loss(p, example_inputs, target):
        batch_of_one = tuple(x.unsqueeze(0) for x in example_inputs)
        return loss_fn(functional_call(module, p, batch_of_one), target.unsqueeze(0))

    return vmap(grad(example_loss), in_dims=(None, 0, 0))(detached, tuple(inputs), targets)


# --------------------------------------------------------------------------- training API

class FastDPOptimizer:
    """One DP-SGD update per :meth:`step`: per-example clipped gradient sum,
    Gaussian noise of std ``noise_multiplier * max_grad_norm`` on the sum,
    divided by the batch size (``expected_batch_size`` if given, as Opacus
    does under Poisson sampling), then the wrapped optimiser's step."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, *,
                 max_grad_norm: float, noise_multiplier: float,
                 expected_batch_size: int | None = None,
                 noise_generator: torch.Generator | None = None):
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier={noise_multiplier!r} must be >= 0")
        self.clipper = FastClipper(module, max_grad_norm)
        self.optimizer = optimizer
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = expected_batch_size
        self.noise_generator = noise_generator

    @property
    def noise_std_on_sum(self) -> float:
        return self.noise_multiplier * self.clipper.max_grad_norm

    def step(self, loss_fn: Callable, inputs: Sequence[torch.Tensor],
             targets: torch.Tensor) -> torch.Tensor:
        """One update on a batch; returns the batch's mean loss (detached).
        An empty batch (Poisson sampling can draw no example) is an update by
        the noise alone, as in Opacus; its loss is NaN."""
        if len(targets) == 0:
            if not self.expected_batch_size:
                raise ValueError("an empty batch needs expected_batch_size (the divisor of the noisy sum)")
            sums = [torch.zeros_like(p) for p in self.clipper.params]
            loss = torch.full((), float("nan"), device=targets.device)
        else:
            sums, loss = self.clipper.clipped_grad_sum(loss_fn, inputs, targets)
        divisor = self.expected_batch_size or len(targets)
        std = self.noise_std_on_sum
        for param, total in zip(self.clipper.params, sums):
            if std > 0:
                total = total + std * torch.randn(total.shape, generator=self.noise_generator,
                                                  dtype=total.dtype, device=total.device)
            param.grad = total / divisor
        self.optimizer.step()
        return loss

    def describe(self, loss_fn, inputs, targets) -> dict:
        return self.clipper.describe(loss_fn, inputs, targets)


def make_private_fast(module: nn.Module, optimizer: torch.optim.Optimizer, *,
                      max_grad_norm: float, noise_multiplier: float,
                      expected_batch_size: int | None = None,
                      noise_generator: torch.Generator | None = None) -> FastDPOptimizer:
    """The kit's fast DP-SGD around ``optimizer`` (Opacus' noise convention:
    std ``noise_multiplier * max_grad_norm`` on the clipped sum). The module
    must already be DP-compatible (GroupNorm, not BatchNorm; out-of-place
    activations). Train with ``dp.step(loss_fn, inputs, targets)``."""
    return FastDPOptimizer(module, optimizer, max_grad_norm=max_grad_norm,
                           noise_multiplier=noise_multiplier,
                           expected_batch_size=expected_batch_size,
                           noise_generator=noise_generator)


def clipped_grad_sum_fast_torch(module, loss_fn, inputs, targets, max_grad_norm) -> list[torch.Tensor]:
    """Sum over the batch of per-example gradients clipped to ``max_grad_norm``,
    before noise, one tensor per trainable parameter (the fast counterpart of
    ``privbench.training.torch_steps.clipped_grad_sum_torch``)."""
    clipper = FastClipper(module, max_grad_norm)
    try:
        return clipper.clipped_grad_sum(loss_fn, inputs, targets)[0]
    finally:
        clipper.remove()


# --------------------------------------------------------------------------- the kit's trainer

class FastDPTrainer(torch_steps._Trainer):
    """Training mode ``fast_dp`` (torch): AdamW on one fixed in-memory batch,
    per-example clipping by :class:`FastClipper`, noise of std noise_std on
    the averaged gradient (noise_std * B on the sum), as in the clipped mode."""

    mode = "fast_dp"

    def __init__(self, *, model, size, batch_size, microbatch_size, settings, seed, device):
        self._build(model, size, batch_size, seed, device)
        clip = settings["l2_clip_norm"]
        noise_multiplier = settings["noise_std"] * batch_size / clip
        self._dp = make_private_fast(
            self._module,
            torch.optim.AdamW(self._module.parameters(), lr=settings["learning_rate"]),
            max_grad_norm=clip, noise_multiplier=noise_multiplier, expected_batch_size=batch_size,
            noise_generator=torch.Generator(self._device).manual_seed(seed))
        self.description = self._describe(
            model, size, batch_size, self._module, settings,
            grad_sample_mode=None, l2_clip_norm=clip,
            noise_std_effective=noise_multiplier * clip / batch_size,
            noise_multiplier=noise_multiplier, poisson_sampling=False,
            **self._dp.describe(self._loss, self._inputs, self._targets))

    def step(self):
        return self._dp.step(self._loss, self._inputs, self._targets)
