"""Where one fine-tuning iteration spends its time: the MobileFaceNet's distillation train net, layer by layer.

The train net is the one python -m finetune builds for distillation from a
table of teacher embeddings (finetune.trainnet: ImageData, the student, the
teacher table read from disk (finetune.teachertable), L2 normalisation, EuclideanLoss; the table's values do
not change the timing, so they are zeros), on the training list of LFW folds
1-5 people.  Caffe's SGD solver runs it; after warm-up, each layer's forward
and backward is timed in turn (pycaffe's _forward/_backward over one layer),
and whole solver steps are timed too, so the per-layer sum can be checked
against a real iteration.  Layer types are pooled (1x1, depthwise and other
convolutions apart).  CPU time of the BLAS threads is in the wall time of the
layer that ran them.  The same train net with its frozen BatchNorm + Scale
layers folded into the convolutions (finetune.fold, --fold-bn) is timed in
the same process, its solver steps interleaved with the first's, and the
ratio of their step times reported.

    .venv/bin/python benchmarks/bench_finetune_profile.py                    # the unpruned MobileFaceNet
    .venv/bin/python benchmarks/bench_finetune_profile.py --model P.prototxt --weights P.caffemodel
"""
import collections
import json
import os
import tempfile
import time

from common import MFN, LFW_DIR, PAIRS, ROOT, machine, parser  # first: puts the repository on sys.path

import numpy as np  # noqa: E402

from base import caffe_io  # noqa: E402
from base.lists import list_text, scan_tree  # noqa: E402


def layer_kind(layer):
    if layer.type != "Convolution":
        return layer.type
    p = layer.convolution_param
    if p.group > 1:
        return "Convolution depthwise" if p.group == p.num_output else "Convolution grouped"
    k = list(p.kernel_size) or [p.kernel_h]
    return "Convolution 1x1" if k and max(k) == 1 else "Convolution kxk"


def train_solver(a, folder, fold_bn=False):
    """Caffe's SGD solver over the distillation train net of --model, reading the list of folds 1-5 people."""
    import caffe
    from eval_lfw.pairs import lfw_people
    from finetune import trainnet
    from finetune.heads import blob_dim
    from finetune.solver import solver
    tree = scan_tree(a.lfw_dir)
    people = sorted(lfw_people(a.pairs, "1-5") & set(tree))
    rels = [r for p in people for r in tree[p]]
    listing = caffe_io.atomic_write(os.path.join(folder, "index.txt"), list_text([(r, i) for i, r in enumerate(rels)]))
    deploy, weights = caffe_io.read_net(a.model), caffe_io.read_weights(a.weights)
    if fold_bn:
        from finetune import fold
        deploy, weights, _ = fold.fold(deploy, weights)
    dim = blob_dim(deploy, a.blob)
    data = trainnet.ImageList(source=listing, root_folder=a.lfw_dir, batch_size=a.batch, rgb=True)
    from finetune.heads import write_table
    table = write_table(np.zeros((len(rels), dim), np.float32), os.path.join(folder, "teacher_table.npy"))
    head = trainnet.Distill(teacher=None, embedding=a.blob, teacher_embedding=a.blob, student_dim=dim,
                            teacher_dim=dim, table=table)
    net = trainnet.train_net(deploy, data, head)
    train = caffe_io.write_net(net, os.path.join(folder, "train.prototxt"))
    s = solver(train, 10 ** 6, os.path.join(folder, "snap"), base_lr=1e-4)
    path = caffe_io.atomic_write(os.path.join(folder, "solver.prototxt"), caffe_io.net_to_text(s))
    sgd = caffe.SGDSolver(path)
    caffe_io.load_into(sgd.net, weights, source=a.weights)
    return sgd, net, len(rels)


def step_times(solvers, rounds):
    """Seconds per solver step of each solver, their steps interleaved round by round (medians)."""
    for s in solvers:
        s.step(2)   # warm-up: allocations, the data layer's prefetch
    times = [[] for _ in solvers]
    for _ in range(rounds):
        for s, t in zip(solvers, times):
            start = time.perf_counter()
            s.step(1)
            t.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def profile(sgd, net_param, rounds):
    """{layer: kind, forward s, backward s} per iteration."""
    net = sgd.net
    names = list(net._layer_names)
    fw, bw = collections.defaultdict(float), collections.defaultdict(float)
    for _ in range(rounds):
        for i in range(len(names)):
            t = time.perf_counter()
            net._forward(i, i)
            fw[names[i]] += time.perf_counter() - t
        for i in reversed(range(len(names))):
            t = time.perf_counter()
            net._backward(i, i)
            bw[names[i]] += time.perf_counter() - t
    params = {l.name: l for l in net_param.layer}
    per_layer = {n: dict(kind=layer_kind(params[n]) if n in params else net.layers[i].type,
                         forward=fw[n] / rounds, backward=bw[n] / rounds) for i, n in enumerate(names)}
    return per_layer


def summary(per_layer):
    """(seconds of all layers, rows per layer kind sorted by share, the slowest layers)."""
    total = sum(v["forward"] + v["backward"] for v in per_layer.values())
    kinds = collections.defaultdict(lambda: dict(forward=0.0, backward=0.0, layers=0))
    for v in per_layer.values():
        k = kinds[v["kind"]]
        k["forward"] += v["forward"]
        k["backward"] += v["backward"]
        k["layers"] += 1
    rows = sorted(({"kind": k, "layers": v["layers"], "forward_s": round(v["forward"], 4),
                    "backward_s": round(v["backward"], 4),
                    "share": round((v["forward"] + v["backward"]) / total, 4)} for k, v in kinds.items()),
                  key=lambda r: -r["share"])
    slowest = sorted(({"layer": n, "kind": v["kind"], "forward_s": round(v["forward"], 4),
                       "backward_s": round(v["backward"], 4)} for n, v in per_layer.items()),
                     key=lambda r: -(r["forward_s"] + r["backward_s"]))[:15]
    return round(total, 4), rows, slowest


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--model", default=MFN + ".prototxt", help="deploy prototxt of the student")
    p.add_argument("--weights", default=MFN + ".caffemodel", help="its caffemodel")
    p.add_argument("--blob", default="fc1", help="embedding blob")
    p.add_argument("--lfw-dir", default=LFW_DIR, help="aligned LFW images")
    p.add_argument("--pairs", default=PAIRS, help="LFW pairs.txt (the training list: folds 1-5 people)")
    p.add_argument("--batch", type=int, default=64, help="training batch (the recipe's 64)")
    p.add_argument("--rounds", type=int, default=5, help="timed iterations")
    p.add_argument("--json", default=os.path.join(ROOT, "docs", "results", "finetune_profile.json"),
                   help="result file")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as plain_dir, tempfile.TemporaryDirectory() as folded_dir:
        plain, plain_net, n_images = train_solver(a, plain_dir)
        folded, folded_net, _ = train_solver(a, folded_dir, fold_bn=True)
        steps = step_times([plain, folded], a.rounds)
        nets = {"as is": summary(profile(plain, plain_net, a.rounds)),
                "BatchNorm folded": summary(profile(folded, folded_net, a.rounds))}
    result = dict(machine=machine(), model=os.path.relpath(a.model, ROOT) if a.model.startswith(ROOT) else a.model,
                  batch=a.batch, rounds=a.rounds, train_images=n_images,
                  solver_step_s={"as is": round(steps[0], 4), "BatchNorm folded": round(steps[1], 4)},
                  folded_speedup=round(steps[0] / steps[1], 3),
                  nets={k: dict(layers_sum_s=v[0], kinds=v[1], slowest=v[2]) for k, v in nets.items()})
    caffe_io.atomic_write(a.json, json.dumps(result, indent=1) + "\n")
    for (name, (total, rows, _)), step in zip(nets.items(), steps):
        print("%s: solver step %.3f s per batch of %d (%.1f images/s); its layers timed one by one sum to %.3f s"
              % (name, step, a.batch, a.batch / step, total))
        print("| layer kind | layers | forward s | backward s | share |\n|---|---|---|---|---|")
        for r in rows:
            print("| %s | %d | %.3f | %.3f | %.1f %% |" % (r["kind"], r["layers"], r["forward_s"], r["backward_s"],
                                                         100 * r["share"]))
    print("folding BatchNorm + Scale: %.2fx faster solver steps (medians of %d interleaved steps)"
          % (steps[0] / steps[1], a.rounds))


if __name__ == "__main__":
    main()
