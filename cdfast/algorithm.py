"""One training step of Competitive Distillation for a group of N >= 2 networks.

The step follows ``ALGORITHM.md``: perturb one random network's batch, N
forwards, cross-entropy per network, elect the teacher (argmin, ties to the
lowest index), distil every student towards it (KL on softmax outputs + L2 on
features; teacher outputs are constants), and let every network step its own
optimizer. The teacher index never leaves the device inside the step, so
later engines can capture the step in a CUDA graph; metrics are read after it.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from cdfast import functional as CF
from cdfast.distributed import (average_gradients, broadcast_state, global_mean, rank_and_world,
                                resolve_process_group)
from cdfast.engines import get_engine, network_device, split_engine_name
from cdfast.engines.graph import GraphStep
from cdfast.options import (ELECTIONS, MODES, PERTURBED_BN, RANGES, TEACHER_RULES, check_choice, check_flag,
                            check_number, check_option, check_teachers, perturbs)
from cdfast.models import split_output
from cdfast.models.adapters import FeatureAdapters, probe_feature_shapes
from cdfast.perturb import PerturbationPool, Perturbed, PerturbOp
from cdfast.perturb.pool import group_pool

log = logging.getLogger("cdfast")

__all__ = ["CompetitiveDistillation", "GroupLosses", "StepResult", "MODES", "TEACHER_RULES", "ELECTIONS",
           "PERTURBED_BN", "split_output"]  # the choices live in cdfast.options

OptimizerFactory = Callable[[list], torch.optim.Optimizer]


def _tap_features(networks: list, layers) -> list:
    """The networks, logits-only ones wrapped to return their features (see ``feature_layers``)."""
    from cdfast.models import FeatureTap

    layers = list(layers)
    if len(layers) != len(networks):
        raise ValueError(f"feature_layers needs one entry per network ({len(networks)}), got {len(layers)}")
    return [net if layer is None else FeatureTap(net, None if layer == "forward_features" else layer)
            for net, layer in zip(networks, layers)]


def _check_same_classes(classes: dict[int, int | None]) -> None:
    """Every network must predict the same K (``None``: not known before a forward)."""
    if len({k for k in classes.values() if k is not None}) > 1:
        raise ValueError(f"the networks predict different numbers of classes {classes}; every network must predict the same K")


@dataclass
class GroupLosses:
    """The results of one step, shapes ``[N]`` unless noted.

    From :meth:`CompetitiveDistillation.losses` the tensors are attached to the graph (call
    ``loss.sum().backward()``); from :meth:`CompetitiveDistillation.step` they are detached
    (read them after the step). ``StepResult`` is the same type.
    """

    loss: Tensor          # what each network minimises: ce + distill
    ce: Tensor            # mean cross-entropy on its own (possibly perturbed) batch
    distill: Tensor       # distillation terms (0 for the teacher, and in independent mode)
    teacher: Tensor       # 0-d int64 device tensor: the elected network
    correct: Tensor       # fraction of the batch each network classified right (own targets)
    perturbed: int        # index of the perturbed network, -1 if none (a host value: drawn on the host)
    perturbation: str | None

    def detached(self) -> "GroupLosses":
        return GroupLosses(self.loss.detach(), self.ce.detach(), self.distill.detach(), self.teacher,
                           self.correct, self.perturbed, self.perturbation)


StepResult = GroupLosses  # what step() returns: the same fields, detached


def default_optimizer(params: list) -> torch.optim.Optimizer:
    """The paper's optimizer: SGD, Nesterov momentum 0.9, lr 0.1, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def graph_optimizer(params: list) -> torch.optim.Optimizer:
    """The paper's optimizer in its capturable form (fused SGD; the graph engine's default)."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True)


class CompetitiveDistillation(nn.Module):
    """A group of networks trained by Competitive Distillation (or a baseline mode).

    Args:
        networks: N >= 2 modules; each returns ``(logits [B, K], features)`` or just logits
            (then set ``feature_loss=False``). All must predict the same K classes.
        optimizers: None (the paper's SGD), a factory ``f(params) -> Optimizer`` called
            once per network with its parameters (and its adapters'), or a list of N
            optimizers you built (adapter parameters are added to them).
        mode: ``"competitive"`` (default), ``"dml"`` (each learns from all others),
            or ``"independent"`` (labels only).
        teachers: with ``mode="competitive"``: ``"best"`` (the argmin teaches everyone)
            or ``"all-better"`` (each learns from every network that did better).
        alpha, beta, temperature: weights of the KL and feature terms, softmax temperature.
        feature_loss: add ``beta * mean((F_i - F_t)^2)`` to the students' losses.
        perturb: perturb one random network's batch per step. None means on for
            ``competitive`` and off for the baselines.
        perturb_prob: probability that any network is perturbed in an eligible step.
        perturb_every: every how many steps one is eligible for a perturbation: 1 (the paper's
            text, default) or e.g. 10 (the authors' code perturbs one batch in ten).
        perturb_ops: op names or callables for the pool (default: crop, noise, mixup,
            cutmix, affine), or a ready :class:`~cdfast.perturb.PerturbationPool`.
        normalization: ``(mean, std)`` per channel that your images were normalized with: the
            perturbations then fill warped corners with true black and clamp to the pixel range
            (without it they use 0, the mean colour, and a warning says so).
        seed: seed of the pool's randomness.
        perturbed_bn: the perturbed network's BatchNorm running statistics: ``"frozen"`` (the
            perturbed batch does not update them; default: evaluation sees clean images, and
            statistics of noisy or mixed batches degrade test accuracy), ``"updated"`` (it
            does), or ``"clean"`` (frozen on the perturbed batch, then updated by a no-grad
            forward of the clean batch).
        matched_inputs: distil every student towards the teacher's output on the
            student's own input: a perturbed student learns from the teacher's view of the
            perturbed batch, clean students from its view of the clean batch. Costs one
            extra no-grad forward of every network (on the other input) in perturbed steps.
            Off by default (the paper: the teacher's output on its own input).
        election: ``"ce"`` (the paper: lowest cross-entropy teaches) or
            ``"clean-equivalent"``: a mixed-label batch's CE minus the entropy of its label
            mix ``H(lam)``, the part no prediction can remove, so a good mixup/cutmix
            perturbation can win the election (which also ranks the all-better rule).
        input_shape: ``(C, H, W)`` of one image. Needed when the networks' features have
            different shapes: the group then probes them once and builds adapters.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forwards under autocast.
        channels_last: feed the networks channels-last batches.
        engine: how the N networks execute: ``"sequential"``, ``"streams"`` (CUDA),
            ``"fused"`` (identical networks as one vmapped network) or ``"auto"`` (on a GPU the
            fastest engine, timed on the first batch; sequential on the CPU); ``"graph"``
            (= ``"sequential+graph"``) or ``"fused+graph"`` capture the whole :meth:`step` in
            CUDA graphs and replay them (CUDA; optimizers must be capturable, e.g.
            ``SGD(..., fused=True)``, which the default optimizer then is); see
            :mod:`cdfast.engines` and :mod:`cdfast.engines.graph`.
        label_smoothing, ignore_index: of every network's cross-entropy, as in
            ``torch.nn.functional.cross_entropy`` (nothing ignored by default). The labels may also
            be class probabilities ``[B, K]`` (soft targets, e.g. torchvision's v2 MixUp/CutMix).
        feature_layers: for networks that return only logits (torchvision, timm): one entry
            per network, ``None`` to leave it as it is, the name of the layer whose output is
            its feature (a forward hook), or ``"forward_features"`` for timm's API; such
            networks are wrapped in :class:`cdfast.models.FeatureTap`.
        process_group: data parallelism on ``torch.distributed``: every rank holds all N networks
            and a shard of each batch; the CEs are all-reduced before the election (one teacher
            for the global batch on every rank) and each network's gradients are averaged
            across ranks after the backward (:mod:`cdfast.distributed`). ``"auto"`` (default):
            the default group when torch.distributed is initialised with several ranks (as
            under ``torchrun``), else none; ``None``: one process; or a ``ProcessGroup``.
        compile: ``torch.compile`` the networks' forwards inside the engine: ``True`` for the
            defaults, or a dict of ``torch.compile`` keyword arguments (e.g.
            ``{"mode": "max-autotune"}``). The losses and optimizer steps stay eager.
    """

    def __init__(
        self,
        networks: Sequence[nn.Module],
        optimizers: Union[None, OptimizerFactory, Sequence[torch.optim.Optimizer]] = None,
        *,
        mode: str = "competitive",
        teachers: str = "best",
        alpha: float = 1.0,
        beta: float = 1.0,
        temperature: float = 1.0,
        feature_loss: bool = True,
        perturb: bool | None = None,
        perturb_prob: float = 1.0,
        perturb_every: int = 1,
        perturb_ops: Union[None, PerturbationPool, Sequence[Union[str, PerturbOp]]] = None,
        seed: int = 0,
        perturbed_bn: str = "frozen",
        matched_inputs: bool = False,
        election: str = "ce",
        input_shape: Sequence[int] | None = None,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        engine: str = "sequential",
        compile: bool | dict = False,
        process_group="auto",
        feature_layers: Sequence[str | None] | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int | None = None,
        normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    ):
        super().__init__()
        networks = list(networks)
        if feature_layers is not None:
            networks = _tap_features(networks, feature_layers)
        if len(networks) < 2:
            raise ValueError(f"Competitive Distillation needs a group of N >= 2 networks, got {len(networks)}")
        check_teachers(mode, teachers)
        alpha, beta = check_option("alpha", alpha), check_option("beta", beta)
        temperature, perturb_prob = check_option("temperature", temperature), check_option("perturb_prob", perturb_prob)
        self.perturb_every = int(check_number("perturb_every", perturb_every, integer=True, **RANGES["perturb_every"]))
        for name, flag in (("feature_loss", feature_loss), ("channels_last", channels_last),
                           ("matched_inputs", matched_inputs)):
            check_flag(name, flag)
        if perturb is not None and not isinstance(perturb, bool):
            raise TypeError(f"perturb must be True, False or None (on for competitive mode), got {perturb!r}")
        check_number("seed", seed, integer=True, ge=0)
        self.label_smoothing = float(check_number("label_smoothing", label_smoothing, ge=0.0, le=1.0))
        self.ignore_index = None if ignore_index is None else int(check_number("ignore_index", ignore_index, integer=True))
        check_choice("election", election)
        check_choice("perturbed_bn", perturbed_bn)
        bad = [i for i, net in enumerate(networks) if not isinstance(net, nn.Module)]
        if bad:
            raise TypeError(f"networks {bad} are not torch.nn.Module instances (got {type(networks[bad[0]]).__name__})")
        _check_same_classes({i: getattr(n, "num_classes", None) for i, n in enumerate(networks)})

        self.networks = nn.ModuleList(networks)
        self.mode, self.teachers = mode, teachers
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.feature_loss = feature_loss and beta != 0.0 and mode != "independent"
        self.perturb = perturbs(perturb, mode)
        self.perturb_prob = perturb_prob
        self.perturbed_bn = perturbed_bn
        self.matched_inputs, self.election = matched_inputs, election
        self.pool = group_pool(perturb_ops, seed, normalization, self.perturb)
        self.autocast_dtype, self.channels_last = autocast_dtype, channels_last
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile must be True/False or a dict of torch.compile options, got {compile!r}")
        self.compile_options = None if compile is False else {} if compile is True else dict(compile)
        self.engine_choice: dict | None = None  # engine auto's measurement, once made
        self.process_group = resolve_process_group(process_group)
        self.rank, self.world_size = rank_and_world(self.process_group)
        if self.ignore_index is not None and self.process_group is not None:
            raise ValueError("ignore_index with a process group is not available yet (the shards' CEs average "
                             "different numbers of labels); drop ignored samples in the loader instead")
        self.pool.rng.rank = self.rank  # the same choices on every rank, the op's own draws per rank
        self._set_engine(engine)
        self.input_shape = tuple(input_shape) if input_shape is not None else None

        shapes = probe_feature_shapes(self.networks, self.input_shape) if self.input_shape is not None else None
        self.adapters = FeatureAdapters(shapes if (shapes and self.feature_loss) else [])
        self.optimizers = self._build_optimizers(optimizers)
        # data parallel: every rank starts from rank 0's weights (as DDP does at construction)
        broadcast_state([*self.networks, self.adapters], self.process_group)

    def _set_engine(self, spec: str) -> None:
        """Switch engines (also mid-run: parameters, optimizers and checkpoints do not depend on it)."""
        self.engine_name, graphed = split_engine_name(spec)
        self.engine_spec = spec
        self._auto_pending = spec == "auto"  # measured at the first CUDA step (cdfast.engines.auto)
        self._engine, self._engine_device = None, None
        if graphed and self.process_group is not None:
            raise ValueError(f"engine {spec!r} captures the step in CUDA graphs, which cannot hold the data-parallel "
                             "all-reduces yet; use sequential, streams, fused or auto under torch.distributed")
        self._graph_step = GraphStep(self) if graphed else None

    def _choose_engine(self, x: Tensor, y: Tensor, views: bool = False) -> None:
        from cdfast.engines import auto

        # timed on this rank alone (no collectives: a candidate failing on one rank must not leave the
        # others waiting in its all-reduces); then every rank takes rank 0's choice
        group, self.process_group = self.process_group, None
        try:
            fastest, seconds, left_out = auto.measure(self, x, y, views=views, data_parallel=group is not None)
        finally:
            self.process_group = group
        timings = ", ".join(f"{name} {1e3 * t:.2f} ms" for name, t in sorted(seconds.items(), key=lambda kv: kv[1]))
        log.info("cdfast: engine auto -> %s (measured per step on this batch: %s%s)", fastest, timings,
                 f"; not timed: {'; '.join(left_out)}" if left_out else "")
        if self.process_group is not None:  # ranks time differently: all take rank 0's choice
            choice = [fastest]
            torch.distributed.broadcast_object_list(choice, src=torch.distributed.get_global_rank(self.process_group, 0),
                                                    group=self.process_group)
            fastest = choice[0]
        self._set_engine(fastest)
        self.engine_choice = {"engine": fastest, "seconds_per_step": seconds, "timings": timings, "left_out": left_out}

    @property
    def graphed(self) -> bool:
        """Whether :meth:`step` runs as CUDA graph replays (engine ``"graph"`` or ``"<engine>+graph"``)."""
        return self._graph_step is not None

    @property
    def n(self) -> int:
        return len(self.networks)

    @property
    def engine(self):
        """The engine for the networks' current device (resolved again after ``.to(device)``)."""
        device = network_device(self.networks)
        if self._engine is None or self._engine_device != device:
            self._engine, self._engine_device = get_engine(self.engine_name, self.networks, self.compile_options), device
        return self._engine

    @property
    def one_teacher(self) -> bool:
        """Whether the elected network alone teaches (competitive, ``teachers="best"``): the fused loss serves it."""
        return self.mode == "competitive" and self.teachers == "best"

    # ---- construction helpers -------------------------------------------------
    def average_gradients(self) -> None:
        """Data parallel: average every network's gradients across the ranks (after the backward, before the
        optimizer steps). :meth:`step` does it; call it yourself when you drive :meth:`losses`. No-op alone."""
        if self.process_group is not None:
            average_gradients(self._params_to_average(), self.process_group)

    def _params_to_average(self) -> list[Tensor]:
        """Every trainable parameter the data-parallel all-reduce averages (DDP-wrapped networks average their own)."""
        ddp = torch.nn.parallel.DistributedDataParallel
        params = [p for net in self.networks if not isinstance(net, ddp) for p in net.parameters()]
        params += [p for i in range(self.n) for p in self.adapters.parameters_of(i)]
        return [p for p in params if p.requires_grad]

    def _build_optimizers(self, optimizers) -> list[torch.optim.Optimizer]:
        param_sets = [list(net.parameters()) + self.adapters.parameters_of(i) for i, net in enumerate(self.networks)]
        if optimizers is None or callable(optimizers):
            factory = optimizers or (graph_optimizer if self.graphed else default_optimizer)
            return [factory(params) for params in param_sets]
        optimizers = list(optimizers)
        if len(optimizers) != self.n:
            raise ValueError(f"got {len(optimizers)} optimizers for {self.n} networks; pass one per network")
        for i, opt in enumerate(optimizers):
            extra = self.adapters.parameters_of(i)
            if extra:
                opt.add_param_group({"params": extra})
        return optimizers

    # ---- the step -------------------------------------------------------------
    def _check_batch(self, x: Tensor, y: Tensor) -> Tensor:
        """Refuse a batch the networks cannot take, with what to do instead; returns int64 labels."""
        if not isinstance(x, Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, C, H, W], got {type(x).__name__}; "
                            "convert with torch.as_tensor(images)")
        if not isinstance(y, Tensor):
            raise TypeError(f"labels must be a torch.Tensor of class indices [B], got {type(y).__name__}; "
                            "convert with torch.as_tensor(labels)")
        if x.dim() != 4:
            raise ValueError(f"expected a batch of images [B, C, H, W], got shape {list(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("the batch is empty (B = 0); skip empty batches before calling the group")
        soft = y.is_floating_point() and y.dim() == 2
        if (y.dim() != 1 and not soft) or y.shape[0] != x.shape[0]:
            raise ValueError(f"labels must be [B] = [{x.shape[0]}] class indices or [B, K] class probabilities, "
                             f"got shape {list(y.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {x.dtype}; convert and normalize them "
                            "first (e.g. x.float() / 255, then subtract the mean and divide by the std)")
        if (y.is_floating_point() and not soft) or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"labels must hold integer class indices [B] (or float class probabilities [B, K]), "
                            f"got {y.dtype} {list(y.shape)}; use labels.long()")
        device = network_device(self.networks)
        for what, t in (("images", x), ("labels", y)):
            if t.device != device:
                raise ValueError(f"the {what} are on {t.device} but the networks are on {device}; "
                                 f"move them with .to({str(device)!r})")
        param = next((p for p in self.networks.parameters() if p.is_floating_point()), None)
        if self.autocast_dtype is None and param is not None and x.dtype != param.dtype:
            raise TypeError(f"the images are {x.dtype} but the networks' parameters are {param.dtype}; convert "
                            f"the batch with x.to({param.dtype}) (or the networks with .to(dtype))")
        for i, net in enumerate(self.networks):
            want = getattr(net, "in_channels", None)
            if want is not None and x.shape[1] != want:
                raise ValueError(
                    f"network {i} ({type(net).__name__}) expects {want}-channel images but the batch has shape "
                    f"{list(x.shape)}; build the model with in_channels={x.shape[1]} or fix the data"
                )
        return y if y.dtype == torch.int64 or y.is_floating_point() else y.long()

    def _draw_perturbation(self, ready: Perturbed | None = None) -> tuple[int, int]:
        """Host choices of this step: the network to perturb (-1: none) and the op's index in the pool
        (-1 with a ``ready`` view: the loader chose the op)."""
        r = self.pool.choose_network(self.n, self.perturb_prob, self.perturb_every) if self.perturb else -1
        return r, (self.pool.choose_op() if r >= 0 and ready is None else -1)

    def losses(self, x: Tensor, y: Tensor, perturbed: Perturbed | None = None) -> GroupLosses:
        """Forward the group on a batch and return every network's loss, attached to the graph.

        Use this to drive the group from your own loop: ``out.loss.sum().backward()``
        gives each network exactly the gradient of its own loss. ``perturbed``: see :meth:`step`.
        Under data parallelism (a process group) the election is already global; call
        :meth:`average_gradients` after the backward, before your optimizer steps.
        """
        y = self._check_batch(x, y)
        perturbed = self._check_view(x, y, perturbed)
        return self._losses(x, y, *self._draw_perturbation(perturbed), ready=perturbed)

    def _check_view(self, x: Tensor, y: Tensor, view: Perturbed | None) -> Perturbed | None:
        """A perturbed view made by the loader: the batch's shape, device and labels, an op name."""
        if view is None:
            return None
        if not isinstance(view, Perturbed):
            raise TypeError(f"perturbed must be a cdfast.perturb.Perturbed (x, y_a, y_b, lam, op), got "
                            f"{type(view).__name__}")
        if self.graphed:
            raise ValueError("a graph engine perturbs inside its captured step and cannot take a view made by the "
                             "loader; use an eager engine (sequential, streams, fused) with a loader's views, or "
                             "pass the plain batch alone")
        if not isinstance(view.x, Tensor) or view.x.shape != x.shape or view.x.device != x.device:
            raise ValueError(f"the perturbed view must be a tensor like the batch ({list(x.shape)} on {x.device}), got "
                             f"{list(getattr(view.x, 'shape', []))} on {getattr(view.x, 'device', None)}")
        for name in ("y_a", "y_b"):
            labels = getattr(view, name)
            if not isinstance(labels, Tensor) or labels.shape != y.shape or labels.device != y.device:
                raise ValueError(f"the perturbed view's {name} must be labels like the batch's ({list(y.shape)} on "
                                 f"{y.device})")
        if not isinstance(view.op, str):
            raise ValueError("the perturbed view must name its op (Perturbed.op), for the step's records")
        as_labels = (lambda t: t) if y.is_floating_point() else (lambda t: t.long())  # probabilities stay as they are
        return dataclasses.replace(view, y_a=as_labels(view.y_a), y_b=as_labels(view.y_b))

    def _losses(self, x: Tensor, y: Tensor, r: int, op: int, ready: Perturbed | None = None) -> GroupLosses:
        """The step's forward part for host choices ``(r, op)``: nothing here reads the device."""
        if self.channels_last and not getattr(self.engine, "runs_contiguous", False):  # fused: it would copy back
            x = x.contiguous(memory_format=torch.channels_last)
            if ready is not None:
                ready = dataclasses.replace(ready, x=ready.x.contiguous(memory_format=torch.channels_last))
        inputs, targets, targets_b, lam = self.pool.perturb_group(x, y, self.n, r, op, ready=ready)
        op_name = (ready.op if ready is not None else self.pool.names[op]) if r >= 0 else None
        # autocast's weight cache must be off where the step is captured in a CUDA graph
        autocast = (torch.autocast(x.device.type, dtype=self.autocast_dtype, cache_enabled=not self.graphed)
                    if self.autocast_dtype is not None else nullcontext())
        frozen_bn = r if self.perturbed_bn != "updated" else -1
        with autocast:
            outs = self.engine.forward(self.networks, inputs, frozen_bn=frozen_bn)
        logits_list, feats_list = zip(*(split_output(i, o) for i, o in enumerate(outs)))
        _check_same_classes({i: z.shape[-1] for i, z in enumerate(logits_list)})
        logits = torch.stack(logits_list)
        ce, teacher = CF.competitive_ce(logits, targets, targets_b, lam, label_smoothing=self.label_smoothing,
                                        ignore_index=self.ignore_index)
        score = ce
        if self.election == "clean-equivalent" and lam is not None:
            # a mixed-label CE cannot fall below the entropy of the mix: compare what is left
            lam_c = lam.to(ce.dtype).clamp(1e-12, 1.0)
            rest = (1.0 - lam.to(ce.dtype)).clamp(1e-12, 1.0)
            score = ce + lam_c * lam_c.log() + rest * rest.log()
            teacher = CF.elect_teacher(score.detach())
        if self.process_group is not None:  # one election for the global batch: the same teacher on every rank
            score = global_mean(score, x.shape[0], self.process_group)
            teacher = CF.elect_teacher(score)
        other = None  # every network's output on the other input (teachers' view of the students' batches)
        needs_other = self.matched_inputs and r >= 0 and self.mode != "independent"
        if needs_other or (r >= 0 and self.perturbed_bn == "clean"):
            other_inputs = [x if i == r else inputs[r] for i in range(self.n)]
            # BatchNorm: only the perturbed network's clean forward may update statistics (perturbed_bn="clean")
            keep = {r} if self.perturbed_bn == "clean" else set()
            with torch.no_grad(), autocast:
                if needs_other:
                    other = self.engine.forward(self.networks, other_inputs, frozen_bn=set(range(self.n)) - keep)
                else:  # only the clean forward that refreshes the perturbed network's statistics
                    self.networks[r](x)
        distill = self._distillation(logits, list(feats_list), score, teacher, other, r)
        own_targets = targets.argmax(-1) if targets.is_floating_point() else targets  # probabilities: the top class
        own_targets = own_targets if own_targets.dim() == 2 else own_targets.expand(self.n, -1)
        hits = (logits.detach().argmax(-1) == own_targets).float()
        if self.ignore_index is not None:  # ignored labels are neither right nor wrong
            counted = (own_targets != self.ignore_index).float()
            correct = (hits * counted).sum(-1) / counted.sum(-1).clamp(min=1.0)
        else:
            correct = hits.mean(-1)
        return GroupLosses(ce + distill, ce, distill, teacher, correct, r, op_name)

    def _distillation(self, logits: Tensor, feats: list, score: Tensor, teacher: Tensor, other=None,
                      r: int = -1) -> Tensor:
        if self.mode == "independent":
            return torch.zeros_like(score)
        kw = dict(temperature=self.temperature, alpha=self.alpha, beta=self.beta)
        stacked = None
        if self.feature_loss:
            if any(f is None for f in feats):
                missing = [i for i, f in enumerate(feats) if f is None]
                raise ValueError(f"networks {missing} return only logits; return (logits, features) or set feature_loss=False")
            shapes = [tuple(f.shape) for f in feats]
            if len(set(shapes)) == 1:
                stacked = torch.stack(feats)
            elif not self.adapters.needed:
                raise ValueError(
                    f"the networks' features have different shapes {shapes}; pass input_shape=(C, H, W) so the "
                    "group can build feature adapters, or set feature_loss=False"
                )
        if other is not None:
            return self._matched_distillation(logits, feats, stacked, score, teacher, other, r)
        if self.one_teacher and (stacked is not None or not self.feature_loss):
            return CF.group_student_loss(logits, stacked, teacher, **kw)
        weights = CF.distillation_weights(score.detach(), self.mode, self.teachers, teacher=teacher)
        feature_l2 = None
        if self.feature_loss:  # only the columns someone learns from: a diverged network reaches no one
            feature_l2 = CF.pairwise_feature_l2(stacked if stacked is not None else feats,
                                                None if stacked is not None else self.adapters.adapt,
                                                teachers=(weights != 0).any(0))
        return CF.weighted_student_loss(logits, feature_l2, weights, **kw)

    def _matched_distillation(self, logits: Tensor, feats: list, stacked: Tensor | None, score: Tensor,
                              teacher: Tensor, other: list, r: int) -> Tensor:
        """Each student towards its teachers' outputs on the student's own input.

        Teacher j's view of the clean batch is its own output (j != r) or its extra forward
        (j == r); of the perturbed batch, the other way round. Row r (the perturbed student)
        reads the perturbed views, every other row the clean ones.
        """
        n = self.n
        other_logits, other_feats = zip(*(split_output(i, o) for i, o in enumerate(other)))

        def views(own, others) -> tuple[list, list]:
            """(every network on the clean batch, every network on the perturbed batch)."""
            return ([others[j] if j == r else own[j] for j in range(n)],
                    [own[j] if j == r else others[j] for j in range(n)])

        clean_logits, pert_logits = (torch.stack(v) for v in views(logits, other_logits))
        clean_feats, pert_feats = views(feats, other_feats) if self.feature_loss else (None, None)
        if self.one_teacher and (stacked is not None or not self.feature_loss):
            # one teacher: per-student targets for the fused loss, row r from the perturbed view
            def per_student(clean: Tensor, pert: Tensor) -> Tensor:
                clean_t, pert_t = clean.index_select(0, teacher), pert.index_select(0, teacher)
                return torch.cat([clean_t] * r + [pert_t] + [clean_t] * (n - r - 1))

            target_feats = (per_student(torch.stack(clean_feats), torch.stack(pert_feats))
                            if stacked is not None else None)
            return CF.group_student_loss(logits, stacked, teacher, temperature=self.temperature, alpha=self.alpha,
                                         beta=self.beta, target_logits=per_student(clean_logits, pert_logits),
                                         target_feats=target_feats)
        weights = CF.distillation_weights(score.detach(), self.mode, self.teachers, teacher=teacher)
        used = weights != 0  # only the columns someone learns from: a diverged network reaches no one
        cols = used.any(0)
        row_is_r = (torch.arange(n, device=logits.device) == r).unsqueeze(1)
        kl = torch.where(row_is_r, CF.pairwise_kl(logits, self.temperature, pert_logits, teachers=cols),
                         CF.pairwise_kl(logits, self.temperature, clean_logits, teachers=cols))
        pair = self.alpha * self.temperature ** 2 * kl
        if self.feature_loss:  # (feature_loss is off when beta is 0)
            if stacked is not None:
                l2_clean = CF.pairwise_feature_l2(stacked, None, torch.stack(clean_feats), teachers=cols)
                l2_pert = CF.pairwise_feature_l2(stacked, None, torch.stack(pert_feats), teachers=cols)
            else:
                l2_clean = CF.pairwise_feature_l2(feats, self.adapters.adapt, clean_feats, teachers=cols)
                l2_pert = CF.pairwise_feature_l2(feats, self.adapters.adapt, pert_feats, teachers=cols)
            pair = pair + self.beta * torch.where(row_is_r, l2_pert, l2_clean)
        return torch.where(used, weights.to(pair.dtype) * pair, 0.0).sum(1)

    def step(self, x: Tensor, y: Tensor, perturbed: Perturbed | None = None) -> StepResult:
        """One full training iteration: perturbation, forwards, election, losses, backward, N optimizer steps.

        With the graph engine the iteration is a CUDA graph replay, and the returned tensors are
        slots of a ring of ``ring_size`` (1024) steps: read them within that many steps.

        ``perturbed``: a perturbed view of this batch made by the loader (e.g. the DALI pipeline of
        :mod:`cdfast.data.dali`), a :class:`~cdfast.perturb.Perturbed` with its op's name. The group
        still draws which network (if any) sees it; the pool's own ops are then not used. Eager
        engines only.
        """
        if self._auto_pending and x.is_cuda:
            self._check_batch(x, y)
            self._choose_engine(x, y, views=perturbed is not None)
        if self._graph_step is not None and perturbed is None:
            return self._graph_step.step(x, y)
        y = self._check_batch(x, y)
        perturbed = self._check_view(x, y, perturbed)
        return self._eager_step(x, y, *self._draw_perturbation(perturbed), ready=perturbed)

    def _eager_step(self, x: Tensor, y: Tensor, r: int, op: int, ready: Perturbed | None = None) -> StepResult:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        out = self._losses(x, y, r, op, ready=ready)
        out.loss.sum().backward()  # losses are decoupled: each network gets only its own gradient
        self.average_gradients()
        for opt in self.optimizers:
            opt.step()
        return out.detached()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As :meth:`torch.nn.Module.load_state_dict`; captured steps are dropped (``assign`` may move tensors)."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self._graph_step is not None:
            self._graph_step._reset()
        return result
