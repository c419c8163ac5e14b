"""Model placement: network i on rank i, for groups too large for one device.

Data parallelism (:mod:`cdfast.distributed`) copies all N networks to every rank. When
the group does not fit on one device, :class:`NetworkPerRank` places one network per
rank instead: every rank sees the whole batch, forwards only its own network, and the
ranks exchange only what the step needs from the others, in one all-gather per step:
every network's logits and features on the batch (``B x (K + D)`` float32 values per
network) and its cross-entropy. Each rank then elects the same teacher, computes its own
student loss towards the teacher's (constant) outputs, and steps its own optimizer. The
step equals :class:`cdfast.CompetitiveDistillation`'s on one device holding all N networks:
the perturbation choices come from the same seeded host RNG on every rank, and every rank
draws the op's numbers (so each stream stays that of one process) while only the chosen
network's rank uses them.

Bytes per step and rank: ``4 * N * B * (K + D + 1 / B)`` received, e.g. 2 x ResNet-50 on
ImageNet at B = 256 per step: 2 x 256 x (1000 + 2048) x 4 = 6.2 MB, against 2 x 102 MB of
gradients a data-parallel step all-reduces. The cost: the ranks wait for each other
once per step (the all-gather), and a network's
device does all of its work on the whole batch (no data parallelism inside a network;
combine with DDP on a sub-group per network if you need both).
"""

from __future__ import annotations

from contextlib import nullcontext
import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from cdfast import functional as CF
from cdfast import reference
from cdfast.algorithm import GroupLosses
from cdfast.distributed import rank_and_world, resolve_process_group
from cdfast.engines.batchnorm import frozen_batchnorm_stats
from cdfast.models import split_output
from cdfast.options import RANGES, check_choice, check_flag, check_number, check_option, check_teachers
from cdfast.perturb.pool import group_pool

__all__ = ["NetworkPerRank"]


class NetworkPerRank:
    """This rank's network of a group placed one network per rank (see the module docstring).

    ``network`` / ``optimizer``: this rank's (the default optimizer is the paper's SGD);
    ``process_group``: N ranks, one per network (``"auto"``: the default group). The other
    options are :class:`cdfast.CompetitiveDistillation`'s, with the same meaning; every rank
    must pass the same ones. :meth:`step` returns the group's :class:`GroupLosses` (every
    network's loss, CE and accuracy, gathered), the same on every rank.
    """

    def __init__(self, network: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 process_group="auto", mode: str = "competitive", teachers: str = "best", alpha: float = 1.0,
                 beta: float = 1.0, temperature: float = 1.0, feature_loss: bool = True, perturb: bool | None = None,
                 perturb_prob: float = 1.0, perturb_every: int = 1, perturb_ops=None, seed: int = 0,
                 perturbed_bn: str = "frozen", autocast_dtype: torch.dtype | None = None, normalization=None):
        self.process_group = resolve_process_group(process_group)
        if self.process_group is None:
            raise RuntimeError("NetworkPerRank places one network per rank: initialise torch.distributed with one "
                               "rank per network (e.g. torchrun --nproc_per_node=N) first")
        self.rank, self.n = rank_and_world(self.process_group)
        if self.n < 2:
            raise ValueError("a group needs at least 2 networks, so at least 2 ranks")
        check_teachers(mode, teachers)
        self.alpha, self.beta = check_option("alpha", alpha), check_option("beta", beta)
        self.temperature, self.perturb_prob = check_option("temperature", temperature), check_option("perturb_prob", perturb_prob)
        self.perturb_every = int(check_number("perturb_every", perturb_every, integer=True, **RANGES["perturb_every"]))
        check_flag("feature_loss", feature_loss)
        check_choice("perturbed_bn", perturbed_bn)
        if perturbed_bn == "clean":
            raise ValueError("perturbed_bn='clean' is not available with one network per rank yet; use frozen or updated")
        self.network = network
        self.mode, self.teachers = mode, teachers
        self.feature_loss = feature_loss and beta != 0.0 and mode != "independent"
        self.perturb = (mode == "competitive") if perturb is None else perturb
        self.perturbed_bn, self.autocast_dtype = perturbed_bn, autocast_dtype
        # The same seed on every rank: the same choices of network and op; rank 0's device draws for
        # the one rank that perturbs (the pool of one process).
        self.pool = group_pool(perturb_ops, seed, normalization, self.perturb)
        params = list(network.parameters())
        self.optimizer = optimizer or torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self._shapes_checked = False

    def _check_shapes(self, x: Tensor) -> None:
        """Every rank's network must give logits (and features) of one shape: the all-gather needs it."""
        with torch.no_grad():
            was = self.network.training
            self.network.eval()
            logits, feats = split_output(self.rank, self.network(x[:1]))
            self.network.train(was)
        mine = (tuple(logits.shape[1:]), None if feats is None else tuple(feats.shape[1:]))
        shapes = [None] * self.n
        dist.all_gather_object(shapes, mine, group=self.process_group)
        if len(set(shapes)) != 1:
            raise ValueError(f"the ranks' networks give outputs of different shapes (logits, features) {shapes}; "
                             "one network per rank needs one shape (feature adapters are not available here)")
        self._shapes_checked = True

    def step(self, x: Tensor, y: Tensor) -> GroupLosses:
        """One training step of the whole group: every rank calls it with the same batch."""
        n, me = self.n, self.rank
        if y.is_floating_point():
            raise TypeError("NetworkPerRank takes class indices [B] (soft targets are not available here yet)")
        y = y.long()
        r = self.pool.choose_network(n, self.perturb_prob, self.perturb_every) if self.perturb else -1
        op = self.pool.choose_op() if r >= 0 else -1
        if not self._shapes_checked:
            self._check_shapes(x)
        inp, y_a, y_b, lam = x, y, None, None
        if r >= 0:  # every rank draws the op's numbers, so its stream stays that of one process
            out = self.pool.apply(op, x, y)
            if r == me:
                inp = out.x
                if out.mixes_labels:
                    y_a, y_b, lam = out.y_a, out.y_b, out.lam
        autocast = (torch.autocast(x.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else nullcontext())
        self.optimizer.zero_grad(set_to_none=True)
        with autocast, frozen_batchnorm_stats(self.network) if (r == me and self.perturbed_bn == "frozen") \
                else nullcontext():
            logits, feats = split_output(me, self.network(inp))
        logits = logits.float()
        if self.feature_loss and feats is None:
            raise ValueError(f"network {me} returns only logits; return (logits, features) or set feature_loss=False")
        lam_t = None
        if lam is not None:
            lam_t = (lam.float().reshape(1) if isinstance(lam, Tensor)
                     else torch.full((1,), float(lam), device=x.device))  # a fill: no host-to-device copy
        # this network's CE alone (competitive_ce scores groups; the election waits for the all-gather)
        ce, _ = reference.competitive_ce(logits.unsqueeze(0), y_a.unsqueeze(0),
                                         None if y_b is None else y_b.unsqueeze(0), lam_t)
        ce = ce[0]
        # one all-gather: [ce, logits, features] of every network
        feats_flat = feats.detach().float().reshape(feats.shape[0], -1) if self.feature_loss else None
        payload = [ce.detach().reshape(1), logits.detach().reshape(-1)]
        if feats_flat is not None:
            payload.append(feats_flat.reshape(-1))
        mine = torch.cat(payload)
        gathered = torch.empty(n * mine.numel(), dtype=mine.dtype, device=mine.device)  # flat: gloo wants it so
        dist.all_gather_into_tensor(gathered, mine, group=self.process_group)
        gathered = gathered.view(n, -1)
        b, k = logits.shape
        all_ce = gathered[:, 0]
        all_logits = gathered[:, 1:1 + b * k].view(n, b, k)
        all_feats = gathered[:, 1 + b * k:].view(n, b, -1) if feats_flat is not None else None
        teacher = CF.elect_teacher(all_ce)
        # every network's row from the all-gather (constants), this rank's own row attached to its graph
        mine_row = (torch.arange(n, device=x.device) == me).view(n, 1, 1)
        stacked_logits = torch.where(mine_row, logits.unsqueeze(0), all_logits)
        if self.mode == "independent":
            distill = torch.zeros(n, device=x.device)
        else:
            stacked_feats = (torch.where(mine_row, feats.float().reshape(1, b, -1), all_feats)
                             if all_feats is not None else None)
            kw = dict(temperature=self.temperature, alpha=self.alpha, beta=self.beta)
            if self.mode == "competitive" and self.teachers == "best":
                distill = CF.group_student_loss(stacked_logits, stacked_feats, teacher, **kw)
            else:
                weights = CF.distillation_weights(all_ce, self.mode, self.teachers, teacher=teacher)
                pair_l2 = (CF.pairwise_feature_l2(stacked_feats, teachers=(weights != 0).any(0))
                           if stacked_feats is not None else None)
                distill = CF.weighted_student_loss(stacked_logits, pair_l2, weights, **kw)
        (ce + distill[me]).backward()  # the other rows are constants: only this rank's network gets gradients
        self.optimizer.step()
        distill = distill.detach()
        # mixup/cutmix keep y as their first labels, so every rank can score every network on y
        correct = (all_logits.argmax(-1) == y).float().mean(-1)
        return GroupLosses(all_ce + distill, all_ce, distill, teacher, correct, r,
                           self.pool.names[op] if r >= 0 else None)
