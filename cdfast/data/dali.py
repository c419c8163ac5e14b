"""NVIDIA DALI input pipelines for image folders: decode once, make the plain and the perturbed view.

Competitive Distillation needs two views of every training batch: the plain one
for N-1 networks and a perturbed one for the network the group chooses. The
training pipeline decodes each image once ("mixed" decoding on the GPU, CPU
otherwise), applies the standard augmentation (random resized crop, flip) and
normalization for the plain view, and applies one op of the perturbation pool to
the same augmented images for the perturbed view. It yields
``(x, y, Perturbed(x', y_a, y_b, lam, op))``, what :meth:`CompetitiveDistillation.step`
takes as ``perturbed=``. The evaluation pipeline resizes and centre-crops.

The ops have the names and parameter ranges of :mod:`cdfast.perturb` (the torch
path): ``crop`` (area 0.3-0.7, aspect 3/4-4/3, per sample), ``noise`` (std
0.1-0.5 on the normalized image, per batch), ``mixup`` (lam ~ Beta(1, 1)),
``cutmix`` (a box of side ``sqrt(1 - Beta(1, 1))``, labels mixed by its area),
``affine`` (rotation +-30 deg, scale 0.8-1.2, shear +-15 deg, shift +-15%, per
sample, black fill), ``flip`` (left-right and upside-down, each p = 1/2, per
sample) and ``rotate`` (+-30 deg). One op per batch: the group's mixed-label
loss takes one ``lam`` per network. DALI has no elastic warp on the CPU (and
none at all before ``fn.experimental.remap``), so ``elastic``, and the authors'
``noise-clamp`` / ``jitter-blur`` (and the ``authors-code`` preset's batch-wide
ops), stay with the torch path.

Randomness is seeded and reproducible: the order of the files (one permutation per
epoch, the same on every rank), the per-batch numbers (op, lam, box, noise std:
host draws fed through an external source) and DALI's per-sample draws (its
pipeline seed) all derive from ``(seed, epoch, rank)``, so a run resumed at an
epoch boundary sees the batches an uninterrupted run would. Ranks take every
``world``-th file of the permutation: their shards are disjoint and together hold
every file (training drops the few that would make ranks unequal, and the last
partial batch, like the torch loader; evaluation keeps everything).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cdfast.data.folder import SKIP_HINT, BadImageError
from cdfast.perturb.ops import Perturbed

__all__ = ["DALI_OPS", "INSTALL_HINT", "DaliLoader", "has_dali", "require_dali", "folder_samples"]

DALI_OPS = ("crop", "noise", "mixup", "cutmix", "affine", "flip", "rotate")
MIXING_OPS = ("mixup", "cutmix")
INSTALL_HINT = ("install NVIDIA DALI with `pip install 'cdfast[dali]'` (the CUDA 13 build nvidia-dali-cuda130 "
                "and nvidia-nvimgcodec-cu13 for decoding), or use the default loader (--loader torch)")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali() -> None:
    """Import DALI or say how to install it."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise ImportError(f"--loader dali needs NVIDIA DALI, which is not installed ({e}); {INSTALL_HINT}") from None


def folder_samples(root: Path, classes: Sequence[str], skip_bad_images: bool = False) -> tuple[list[str], list[int]]:
    """The image files of ``root/<class>/`` with their class index, sorted like torchvision's ImageFolder."""
    files, labels = [], []
    for k, name in enumerate(classes):
        folder = root / name
        found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) \
            if folder.is_dir() else []
        files += [str(p) for p in found]
        labels += [k] * len(found)
    if not files:
        raise FileNotFoundError(f"{root} holds no images in its class folders ({', '.join(IMAGE_SUFFIXES)})")
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        if not skip_bad_images:
            raise BadImageError(f"{len(empty)} empty image file(s) in {root}, e.g. {empty[0]}; {SKIP_HINT}")
        warnings.warn(f"cdfast: skipping {len(empty)} empty image file(s) in {root}, e.g. {empty[0]}", stacklevel=2)
        keep = [i for i, f in enumerate(files) if f not in set(empty)]
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    return files, labels


def _derived_seed(*parts: int) -> int:
    """A 31-bit seed from several integers (DALI seeds are int32)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


class _BatchNumbers:
    """The per-batch numbers of the perturbed view, drawn on the host (seeded): which op, and its
    scalars. Fed to the pipeline through an external source, one copy per sample."""

    def __init__(self, ops: Sequence[str], batch_size: int, image_size: int, seed: int, op_seed: int | None = None):
        self.ops, self.b, self.s = list(ops), batch_size, image_size
        self.rng = np.random.default_rng(seed)  # the op's own numbers: per rank
        # which op: the same on every rank (data parallel: the perturbed network gets one op everywhere)
        self.op_rng = np.random.default_rng(seed if op_seed is None else op_seed)

    def __call__(self):
        s, rng = self.s, self.rng
        name = self.ops[int(self.op_rng.integers(len(self.ops)))]
        op = DALI_OPS.index(name)
        lam, sigma = 1.0, 0.0
        # row 0 pastes the whole image; row 1 the partner's box. An empty box sits at the far corner
        # (s, s): the GPU paste kernel opens a region at a zero-size box's anchor and never closes it.
        anchors = np.array([[0, 0], [s, s]], np.int32)
        shapes = np.array([[s, s], [0, 0]], np.int32)
        if name == "mixup":
            lam = float(rng.beta(1.0, 1.0))
        elif name == "cutmix":  # the torch op's box: side ratio sqrt(1 - Beta), centre uniform, clipped
            ratio = math.sqrt(1.0 - rng.beta(1.0, 1.0))
            half = int(s * ratio) // 2
            cy, cx = int(rng.integers(s)), int(rng.integers(s))
            y0, y1, x0, x1 = max(cy - half, 0), min(cy + half, s), max(cx - half, 0), min(cx + half, s)
            if y1 > y0 and x1 > x0:
                anchors[1] = (y0, x0)
                shapes[1] = (y1 - y0, x1 - x0)
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (s * s)
        elif name == "noise":
            sigma = float(rng.uniform(0.1, 0.5))
        def each(value, dtype):
            return [np.array(value, dtype)] * self.b

        return (each(op, np.int32), each(lam, np.float32), each(sigma, np.float32), [anchors] * self.b,
                [shapes] * self.b)


class _ArrayFeed:
    """Samples of an in-memory set for an external source: uint8 HWC images and labels, in a given order."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, order: Sequence[int], batch_size: int):
        self.images, self.labels, self.order, self.b = images, labels, list(order), batch_size
        self.k = 0

    def __call__(self):
        if self.k >= len(self.order):
            raise StopIteration
        idx = self.order[self.k:self.k + self.b]
        self.k += self.b
        return [self.images[i] for i in idx], [self.labels[i:i + 1] for i in idx]


def _pipeline(source, *, train: bool, numbers, batch_size, image_size, channels, mean, std, pad, device_id, threads,
              seed):
    """The DALI pipeline of one epoch: read (files or arrays), augment, normalize; with ``numbers``, also the
    perturbed view. ``source``: ``(files, labels)`` for a folder, an :class:`_ArrayFeed` for arrays."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    s = image_size
    gpu = device_id is not None
    mean255, std255 = [255.0 * m for m in mean], [255.0 * v for v in std]

    def normalize(img):
        return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=mean255, std=std255)

    def on_device(node):  # per-sample scalars used in arithmetic with the images
        return node.gpu() if gpu else node

    def read():
        """Images (uint8 HWC, on the pipeline's device) and labels, augmented for training."""
        if isinstance(source, _ArrayFeed):
            img, y = fn.external_source(source=source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32],
                                        layout=["HWC", ""])
            img = on_device(img)
            if train:  # the in-memory sets' standard augmentation: pad with black, random crop, flip
                # integer values drawn from the list: an integer dtype with range= rounds a continuous
                # draw, which would reach pad + 1 and give the end values half weight
                shift = fn.random.uniform(values=[float(v) for v in range(-pad, pad + 1)], shape=[2],
                                          dtype=types.INT32)
                img = fn.slice(img, start=shift, shape=[s, s], axes=[0, 1], out_of_bounds_policy="pad", fill_values=0)
            return (fn.flip(img, horizontal=fn.random.coin_flip()) if train else img), y
        files, labels = source
        jpegs, y = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="Reader",
                                   pad_last_batch=not train)
        img = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu",
                                output_type=types.RGB if channels == 3 else types.GRAY)
        if train:
            img = fn.random_resized_crop(img, size=[s, s], random_area=[0.08, 1.0])
            return fn.flip(img, horizontal=fn.random.coin_flip()), y
        img = fn.resize(img, resize_shorter=round(s * 256 / 224))
        return fn.crop(img, crop=[s, s]), y

    def affine(img, degrees, scale, shear, shift):
        centre = [s / 2.0, s / 2.0]
        m = fn.transforms.rotation(angle=fn.random.uniform(range=[-degrees, degrees]), center=centre)
        if scale is not None:  # one zoom for both axes; a shear along x
            both = types.Constant(np.ones(2, np.float32), device="cpu")
            m = fn.transforms.scale(m, scale=fn.random.uniform(range=scale) * both, center=centre)
            along_x = types.Constant(np.array([1.0, 0.0], np.float32), device="cpu")
            m = fn.transforms.shear(m, angles=fn.random.uniform(range=[-shear, shear]) * along_x, center=centre)
            m = fn.transforms.translation(m, offset=fn.random.uniform(range=[-shift * s, shift * s], shape=[2]))
        return fn.warp_affine(img, matrix=m, fill_value=0.0, inverse_map=False, size=[s, s])

    @pipeline_def(enable_conditionals=True)
    def pipeline():
        img, y = read()
        plain = normalize(img)
        if numbers is None:
            return plain, y
        op, lam, sigma, anchors, shapes = fn.external_source(source=numbers, num_outputs=5, batch=True)
        perm = fn.batch_permutation()
        partner = fn.permute_batch(img, indices=perm)
        y_b = fn.permute_batch(y, indices=perm)
        # one op per batch (every sample carries the same index into DALI_OPS): the branches never mix
        if op == 0:  # crop
            anchor, shape = fn.random_crop_generator(types.Constant(np.array([s, s], np.int64), device="cpu"),
                                                     random_area=[0.3, 0.7], random_aspect_ratio=[3 / 4, 4 / 3])
            pert = normalize(fn.resize(fn.slice(img, start=anchor, shape=shape, axes=[0, 1]), size=[s, s]))
        elif op == 1:  # noise, on the normalized image
            pert = plain + fn.random.normal(plain) * on_device(sigma)
        elif op == 2:  # mixup (linear, so mixing before normalizing is the same as after)
            w = on_device(lam)
            pert = normalize(fn.cast(img, dtype=types.FLOAT) * w + fn.cast(partner, dtype=types.FLOAT) * (1.0 - w))
        elif op == 3:  # cutmix: the whole image, then the partner's box over it
            pert = normalize(fn.multi_paste(img, partner, in_anchors=anchors, shapes=shapes, out_anchors=anchors))
        elif op == 4:  # affine
            pert = normalize(affine(img, 30.0, [0.8, 1.2], 15.0, 0.15))
        elif op == 5:  # flip
            pert = normalize(fn.flip(img, horizontal=fn.random.coin_flip(), vertical=fn.random.coin_flip()))
        else:  # rotate
            pert = normalize(affine(img, 30.0, None, 0.0, 0.0))
        return plain, pert, y, y_b, op, lam

    # exec_dynamic=False: the iterator then copies every output into a tensor torch allocated, on torch's
    # current stream, and DALI orders its own buffer's reuse after that copy. (The dynamic executor, DALI
    # 2's default, hands its buffers over by DLPack, and DALI may reuse them once the last reference goes,
    # while a copy torch queued may still read them; its host buffers are pinned, so even the labels'
    # asynchronous copy could read a later batch's.) Nothing here needs the dynamic executor.
    return pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=2, exec_dynamic=False)


class DaliLoader:
    """Batches of one split through a DALI pipeline; iterate once per epoch.

    Built from an image folder (:meth:`from_folder`: decoded by DALI) or from uint8 arrays
    held in memory (:meth:`from_arrays`: Fashion-MNIST, CIFAR; fed by an external source).
    Training with ``ops`` yields ``(x, y, Perturbed)`` (see the module docstring), without
    ops ``(x, y)``; evaluation yields ``(x, y)``, the last batch partial. ``device``: a CUDA
    device decodes with nvJPEG and runs every op on the GPU; ``"cpu"`` runs the CPU
    pipeline. ``rank`` / ``world``: this process's shard. Tensors come out on ``device``
    (float32 images ``[B, C, H, W]``, normalized with ``mean`` / ``std``; int64 labels).
    """

    def __init__(self, source, labels: Sequence[int], *, train: bool, batch_size: int, image_size: int,
                 in_channels: int, mean: Sequence[float], std: Sequence[float], seed: int,
                 ops: Sequence[str] = (), pad: int = 0, device: str | torch.device = "cpu", rank: int = 0,
                 world: int = 1, threads: int | None = None, subset: int | None = None):
        require_dali()
        if not 0 <= rank < world:
            raise ValueError(f"rank must lie in [0, world={world}), got {rank}")
        if in_channels not in (1, 3):
            raise ValueError(f"DALI reads RGB (3 channels) or grey (1 channel) images, not {in_channels}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ops = list(ops) if train else []
        unknown = [op for op in ops if op not in DALI_OPS]
        if unknown:
            raise ValueError(f"the DALI pipeline has no {', '.join(map(str, unknown))} op (it has "
                             f"{', '.join(DALI_OPS)}); choose --perturb-ops among those, or use --loader torch")
        self.source, self.labels = source, list(labels)
        self.samples = list(range(len(self.labels)))
        if subset is not None and subset < len(self.samples):
            self.samples = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(seed))[:subset].tolist()
        self.train, self.batch_size, self.image_size, self.channels = train, batch_size, image_size, in_channels
        self.mean, self.std, self.pad = tuple(mean), tuple(std), pad
        self.seed, self.ops, self.rank, self.world = seed, ops, rank, world
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        elif self.device.type == "cpu":
            self.device_id = None
        else:
            raise ValueError(f"the DALI loader runs on cpu or cuda devices, not {self.device}")
        # the CPU cores of a node are shared by its ranks (torchrun sets LOCAL_WORLD_SIZE)
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.threads = threads or max(1, min(8, (os.cpu_count() or 1) // local_ranks))
        self.epoch = 0  # training epochs handed out; the next iteration is epoch + 1's
        self._consumed: list[int] | None = None  # [batches the epoch being iterated has handed out]
        self._resume_batch = 0  # from load_state_dict: the batch the next iteration starts at
        self.replay_seconds = 0.0  # of the iteration in progress: running the batches before a resume again
        if train and len(self.samples) // world < batch_size:
            raise ValueError(f"rank {rank} holds {len(self.samples) // world} training images, fewer than one batch "
                             f"of {batch_size}; lower --batch-size or add images")

    @classmethod
    def from_folder(cls, root: Path, classes: Sequence[str], *, skip_bad_images: bool = False, **kw) -> "DaliLoader":
        """The images of ``root/<class>/`` (decoded by DALI); ``kw`` as for the constructor."""
        files, labels = folder_samples(Path(root), classes, skip_bad_images)
        return cls(files, labels, **kw)

    @classmethod
    def from_arrays(cls, images: torch.Tensor, labels: torch.Tensor, **kw) -> "DaliLoader":
        """uint8 images ``[N, C, H, W]`` and their labels, held in memory; ``kw`` as for the constructor."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
        hwc = np.ascontiguousarray(images.cpu().permute(0, 2, 3, 1).numpy())
        return cls(hwc, labels.cpu().tolist(), **kw)

    def shard(self, epoch: int) -> list[int]:
        """This rank's samples in ``epoch``'s order: every world-th of the epoch's permutation (training, the
        same on every rank; the few that would make ranks unequal are left out), or of all samples."""
        order = self.samples
        if self.train:
            perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(_derived_seed(self.seed, epoch)))
            order = [order[i] for i in perm[: len(order) - len(order) % self.world].tolist()]
        return order[self.rank::self.world]

    def __len__(self) -> int:
        size = len(self.samples) // self.world if self.train else len(self.shard(0))
        return size // self.batch_size if self.train else math.ceil(size / self.batch_size)

    def _build(self, epoch: int, mine: list[int]):
        if isinstance(self.source, np.ndarray):
            labels = np.asarray(self.labels, np.int32)
            # training drops the last partial batch, like the reader's epoch with LastBatchPolicy.DROP
            mine = mine[: len(mine) - len(mine) % self.batch_size] if self.train else mine
            source = _ArrayFeed(self.source, labels, mine, self.batch_size)
        else:
            source = ([self.source[i] for i in mine], [self.labels[i] for i in mine])
        numbers = (_BatchNumbers(self.ops, self.batch_size, self.image_size, _derived_seed(self.seed, epoch, self.rank, 1),
                                 op_seed=_derived_seed(self.seed, epoch, 2)) if self.ops else None)
        return _pipeline(source, train=self.train, numbers=numbers, batch_size=self.batch_size,
                         image_size=self.image_size, channels=self.channels, mean=self.mean, std=self.std,
                         pad=self.pad, device_id=self.device_id, threads=self.threads,
                         seed=_derived_seed(self.seed, epoch, self.rank))

    def __iter__(self):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        epoch = self.epoch + 1 if self.train else 0
        outputs = ["x", "pert", "y", "y_b", "op", "lam"] if self.ops else ["x", "y"]
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        mine = self.shard(epoch)
        try:
            pipe = self._build(epoch, mine)
            pipe.build()
            if isinstance(self.source, np.ndarray):  # an external source ends the epoch itself
                batches = DALIGenericIterator([pipe], outputs, last_batch_policy=policy, auto_reset=False)
            else:
                batches = DALIGenericIterator([pipe], outputs, reader_name="Reader", last_batch_policy=policy,
                                              auto_reset=False)
        except RuntimeError as e:
            if not _decode_failure(e):
                raise
            raise BadImageError(self._failure(e, mine, 0)) from None
        if self.train:
            self.epoch = epoch
        skip, self._resume_batch = self._resume_batch, 0
        if skip and self.rank == 0:  # DALI's random state is its pipeline's: run the batches before it again, unused
            print(f"cdfast: DALI: running the {skip} batches of epoch {epoch} before the checkpoint again to "
                  "continue exactly where it stopped", flush=True)
        self._consumed = handed = [0]  # (the shard's samples are `mine`)
        done, self.replay_seconds = 0, 0.0
        started = time.perf_counter()
        try:
            while True:
                try:
                    (batch,) = next(batches)
                except StopIteration:
                    return
                except RuntimeError as e:  # DALI does not say which file it could not decode: find it
                    if not _decode_failure(e):
                        raise
                    raise BadImageError(self._failure(e, mine, done)) from None
                done += 1
                handed[0] = done
                if done <= skip:
                    if done == skip:  # not training time: the trainer leaves it out of images/s
                        self.replay_seconds = time.perf_counter() - started
                    continue
                yield self._unpack(batch)
        finally:
            if self._consumed is handed:  # not a newer iteration's
                self._consumed = None

    def _unpack(self, batch):
        x = _owned(batch["x"], self.device)
        y = batch["y"].reshape(-1).to(self.device, dtype=torch.int64, non_blocking=True)
        if not self.ops:
            return x, y
        name = DALI_OPS[int(batch["op"].reshape(-1)[0])]  # a CPU output: no device sync
        mixed = name in MIXING_OPS
        y_b = batch["y_b"].reshape(-1).to(self.device, dtype=torch.int64, non_blocking=True) if mixed else y
        lam = float(batch["lam"].reshape(-1)[0]) if mixed else 1.0
        return x, y, Perturbed(x=_owned(batch["pert"], self.device), y_a=y, y_b=y_b, lam=lam, op=name)

    resumes_mid_epoch = True  # a state taken between batches continues at the next batch (after re-running those before)

    def state_dict(self) -> dict:
        """The epochs handed out; between two training batches also the epoch's next batch."""
        if self._resume_batch:  # loaded, not iterated yet: the epoch to run again, from that batch
            return {"epoch": self.epoch + 1, "next_batch": self._resume_batch}
        state = {"epoch": self.epoch}
        if self.train and self._consumed is not None and 0 < self._consumed[0] < len(self):
            state["next_batch"] = self._consumed[0]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._resume_batch = int(state["epoch"]), 0
        if "next_batch" in state:
            first = state["next_batch"]
            if not isinstance(first, int) or not 0 < first < len(self) or self.epoch < 1:
                raise ValueError(f"the saved position within an epoch (batch {first} of epoch {self.epoch}) does "
                                 f"not fit this data ({len(self)} batches): it was saved for other data")
            self.epoch, self._resume_batch = self.epoch - 1, first  # the next iteration is that epoch again

    def _failure(self, error: Exception, mine: list[int], done: int) -> str:
        """What went wrong, naming the unreadable file among the batches DALI was working on."""
        text = str(error)
        reason = next((line.strip() for line in text.splitlines() if "failure" in line or "rror:" in line), "")
        if isinstance(self.source, np.ndarray):
            return f"the DALI pipeline failed: {reason or text[:300]}"
        window = [self.source[i] for i in mine[done * self.batch_size:(done + 3) * self.batch_size]]  # prefetched too
        bad = next((f for f in window if _unreadable(f)), None)
        if bad is None:
            return f"the DALI pipeline failed ({reason or text[:300]}); no unreadable image found in the batch"
        return (f"cannot read image {bad} (DALI: {reason or 'decode failed'}); remove or replace the file (the DALI "
                "loader cannot skip unreadable images: --skip-bad-images skips only empty files with it; "
                "--loader torch skips unreadable ones too)")


def _decode_failure(error: Exception) -> bool:
    """Whether DALI failed decoding an image (not, e.g., out of memory or a decoder that cannot start)."""
    text = str(error).lower()
    return "decod" in text and "out of memory" not in text


def _owned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. The iterator's outputs are already tensors torch allocated (the pipeline
    runs with ``exec_dynamic=False``), so the caching allocator tracks their use on other streams
    (the streams engine's ``record_stream``); a GPU output stays where it is, a CPU one is copied."""
    return t.to(device, non_blocking=True)


def _unreadable(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception:  # noqa: BLE001 - any decode failure
        return True
    return False
