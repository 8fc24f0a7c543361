"""What one sweep worker does for one checkpoint: a Job (one checkpoint's weights at one evaluation size, its
results keyed by every input that changes them) and the counting of hits over one pass of the validation data,
with and without the mirror average (--flip)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from gluon_imagenet.sweep_eval.settings import EMA_EXT


@dataclass(frozen=True)
class Job:
    """One checkpoint's weights at one evaluation size: one pass over the validation data, giving a result per
    flip setting (the mirrored forward pass reuses the decoded batch)."""
    checkpoint: str  # name, e.g. ckpt-00001302
    params_path: str
    model: str
    classes: int
    image_size: int
    data_dir: str
    record: object  # checkpoint.Record (not imported: the worker's module stays light)
    crop_fraction: float
    batch_size: int
    data_root: str  # absolute
    data_id: str  # what identifies the packed validation data (pack.json's key, else the file's size and time)
    eval_scale: float = 1.0  # of the checkpoint's size (phase or fixed policy)
    flips: tuple = (False,)  # True: the softmax of each image and its mirror, averaged
    weights: str = "raw"  # raw: .params; ema: the record's .ema.params

    @property
    def params_sha256(self) -> str:
        return self.record.params_sha256 or ""

    @property
    def ema_sha256(self) -> str | None:
        return (self.record.files.get(EMA_EXT) or {}).get("sha256") if self.weights == "ema" else None

    @property
    def weights_path(self) -> str:
        return self.params_path[: -len(".params")] + EMA_EXT if self.weights == "ema" else self.params_path

    def key_for(self, flip: bool) -> str:
        """Every input that changes the answer: the checkpoint file itself (and its EMA file), the crop, the data,
        the batching, the scale, the flip. Readable name and size first; the rest as a digest. The default setting
        (scale 1, no flip, raw weights) keeps the digest of the sweeps before settings existed: their results are
        still reused."""
        settings = [self.params_sha256, self.data_root, self.data_id, self.crop_fraction, self.batch_size]
        default = (self.eval_scale, flip, self.weights) == (1.0, False, "raw")
        if not default:
            settings += [self.eval_scale, flip, self.weights, self.ema_sha256]
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        tags = ("" if self.eval_scale == 1 else f"x{self.eval_scale:g}") + ("+flip" if flip else "") + \
            ("+ema" if self.weights == "ema" else "")
        return f"{self.checkpoint}@{self.image_size}/{self.data_dir}{tags}#{digest}"

    @property
    def keys(self) -> list[str]:
        return [self.key_for(f) for f in self.flips]

    @property
    def key(self) -> str:
        return self.keys[0]


def count_hits(net, ctx, iterator, total: int, batch_size: int) -> tuple[int, int, int]:
    """(top-1 hits, top-5 hits, images) over one pass of a freshly reset validation iterator, each image counted
    exactly once."""
    return count_hits_per_flip(net, ctx, iterator, total, batch_size, (False,))[0]


def flip_averaged(net, data, scores=None):
    """The mean of the softmax of each image of an NCHW batch and of its horizontal mirror, flipped on the device
    (axis 3 is the width): one more forward pass of the decoded batch. `scores`: net(data), when already known."""
    import mxnet as mx

    scores = net(data) if scores is None else scores
    return (mx.nd.softmax(scores) + mx.nd.softmax(net(mx.nd.flip(data, axis=3)))) / 2


def count_hits_per_flip(net, ctx, iterator, total: int, batch_size: int, flips) -> list[tuple[int, int, int]]:
    """count_hits for each flip setting in one pass: flip=True ranks the mean of the softmax of each image and of
    its horizontal mirror, the same decoded batch flipped on the device (one more forward pass, no second
    decode)."""
    import mxnet as mx

    hits = [[0, 0] for _ in flips]
    seen = 0
    for batch in iterator:
        # round_batch=False fills the last batch with stale samples and reports pad=0: count real ones here.
        real = min(batch_size, total - seen)
        if real <= 0:
            break
        data = batch.data[0].as_in_context(ctx)
        scores = net(data)
        labels = batch.label[0][:real].as_in_context(ctx).reshape((-1, 1))
        for counts, flip in zip(hits, flips):
            ranked_scores = (flip_averaged(net, data, scores) if flip else scores)[:real]
            ranked = mx.nd.topk(ranked_scores, k=min(5, scores.shape[1]), ret_typ="indices").astype(labels.dtype)
            counts[0] += int((ranked[:, 0:1] == labels).sum().asscalar())
            counts[1] += int((ranked == labels).sum().asscalar())
        seen += real
    return [(top1, top5, seen) for top1, top5 in hits]
