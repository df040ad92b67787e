"""The fine-tunes a pruning driver runs: distillation of each pruned net from a teacher (the unpruned net).

    spec = FineTuneSpec(train_list=..., epochs_per_layer=1, epochs_final=9, lr=1e-3, batch=64)
    step, final = distill_hooks(spec, teacher_proto, teacher_weights)
    prune.driver.run(job, images, finetune=step, final_finetune=final)

Each hook is ``hook(out, proto, weights) -> fine-tuned caffemodel`` (None
when its epochs are 0); every fine-tune is a resumable ``finetune.driver``
job in ``out``.
"""
import os
from dataclasses import dataclass
from typing import Optional, Tuple

from . import driver


@dataclass(frozen=True)
class FineTuneSpec:
    """How the pruned nets are fine-tuned: built once from the command line, never changed."""
    train_list: Optional[str] = None     # None until the caller knows it (dataclasses.replace fills it in)
    train_root: str = ""
    epochs_per_layer: float = 0          # after each pruned group
    epochs_final: float = 0              # after the last group
    lr: float = 1e-3
    lr_steps: Tuple[float, ...] = ()     # fractions of the iterations where the lr is divided by 10
    batch: int = 64
    embedding: str = "fc5"
    rgb: bool = False
    mirror: bool = True
    precompute_teacher: bool = False
    snapshot_every: int = 500
    seed: int = 0
    gpu: Optional[Tuple[int, ...]] = None
    progress: bool = True
    cache_dir: Optional[str] = None      # feature cache of the teacher's embeddings (None: the default)
    similarity: float = 0.0              # weight of the batch's pairwise-cosine loss (finetune.similarity)
    similarity_hard: float = 0.0
    fold_bn: bool = False                # frozen BatchNorm + Scale folded into the convs while training

    def schedule(self, epochs):
        """lr policy and step iterations of a fine-tune of ``epochs`` over the list."""
        if not self.lr_steps:
            return dict(lr_policy="fixed")
        from base.lists import read_list
        from .solver import iterations
        n = iterations(len(read_list(self.train_list, self.train_root, check_files=False)), epochs, self.batch)
        return dict(lr_policy="multistep", gamma=0.1,
                    stepvalues=tuple(sorted({max(1, int(n * f)) for f in self.lr_steps})))

    def job(self, out, proto, weights, epochs, teacher, teacher_weights):
        """The finetune.driver job that distils ``proto`` + ``weights`` from the teacher for ``epochs``."""
        return driver.FineTuneJob(**self.schedule(epochs), deploy=proto, weights=weights, train_list=self.train_list,
                                  root_folder=self.train_root, out=out, head="distill", embedding=self.embedding,
                                  teacher=teacher, teacher_weights=teacher_weights,
                                  precompute_teacher=self.precompute_teacher, mirror=self.mirror, rgb=self.rgb,
                                  epochs=epochs, batch_size=self.batch, base_lr=self.lr,
                                  snapshot_every=self.snapshot_every, seed=self.seed,
                                  gpu=list(self.gpu) if self.gpu is not None else None, cache_dir=self.cache_dir,
                                  similarity_weight=self.similarity, similarity_hard=self.similarity_hard,
                                  fold_bn=self.fold_bn)


def add_similarity(group):
    """--distill-similarity and --similarity-hard: the same two flags in every command that distils."""
    from base import cli
    group.add_argument("--distill-similarity", type=cli.non_negative, default=0.0, metavar="W",
                       help="distill: also match the cosine between every two faces of a batch to the teacher's "
                            "(finetune.similarity; the operating points of face systems live in those cosines), "
                            "with this loss weight (default 0: off; about 10 makes it as large as the embedding "
                            "loss at the start)")
    group.add_argument("--similarity-hard", type=cli.non_negative, default=0.0, metavar="H",
                       help="with --distill-similarity: weigh pair (i, j) by exp(H * teacher cosine), so the pairs "
                            "the teacher finds alike (the impostors that decide a low FAR) count most "
                            "(default 0: all pairs alike)")


def add_fold_bn(group):
    """--fold-bn, in every command that fine-tunes."""
    group.add_argument("--fold-bn", action="store_true",
                       help="train with every frozen BatchNorm (use_global_stats: true) + Scale after a convolution "
                            "folded into that convolution, the teacher's too (finetune.fold): the same function, "
                            "fewer single-threaded layers per iteration; the deploy net keeps its layers (BatchNorm "
                            "the identity, the shift in Scale)")


def distill_hooks(spec, teacher, teacher_weights, check_in=None):
    """(after each group, after the last) fine-tune hooks of ``spec``; a hook is None where its epochs are 0.
    ``check_in`` (the caller's run folder): every fine-tune is checked now (finetune.driver.check_job, on the
    unpruned net: the pruned ones are smaller), so that a setting it refuses stops the run before any work."""
    def hook(epochs):
        if not epochs:
            return None
        if check_in is not None:
            driver.check_job(spec.job(os.path.join(check_in, "finetune"), teacher, teacher_weights, epochs, teacher,
                                      teacher_weights))

        def run_one(out, proto, weights):
            job = spec.job(out, proto, weights, epochs, teacher, teacher_weights)
            return driver.finetune(job, resume=True, progress=spec.progress)["final"]
        return run_one
    return hook(spec.epochs_per_layer), hook(spec.epochs_final)
