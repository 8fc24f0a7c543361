"""Trainer.step (the update alone) for ResNet-50, NAG vs SGD with momentum, side by side in one run:

    .venv/bin/python bench/optimizer_step.py --repeats 30

NAG has no aggregated update in MXNet 1.9.1: Trainer.step issues one `nag_mom_update` per parameter (161 for
ResNet-50 v1b). SGD with momentum goes through `multi_sgd_mom_update`, MXNET_OPTIMIZER_AGGREGATION_SIZE
parameters per call: MXNet's default 4, and 60 (NVIDIA's value, which the recipe's `optimizer: sgd` sets on GPUs
where the variable is unset: learner.SGD_AGGREGATION_GPU).
On a GPU the host time is what matters: the update kernels are short, and a host that issues 161 of them per
step can fall behind the device. Both sides use the same network, the same gradients and the same Learner code;
each repeat times `trainer.step` until it returns (host time), then until its work is done (`mx.nd.waitall`).
The sides alternate, repeat by repeat, so a busy machine slows both alike.
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50_v1b")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    import mxnet as mx

    from gluon_imagenet.devices import Device
    from gluon_imagenet.dist import Ranks
    from gluon_imagenet.train.learner import Learner

    data = mx.nd.random.randint(0, 256, shape=(2, 3, 32, 32)).astype("uint8")
    label = mx.nd.array([0, 1])
    learners = {}
    for name, optimizer, aggregation in (("nag", "nag", None), ("sgd-4", "sgd", 4), ("sgd-60", "sgd", 60)):
        learners[name] = Learner(model=args.model, classes=1000, device=Device("cpu"), ranks=Ranks(), seed=0,
                                 lr=0.01, momentum=0.9, weight_decay=5e-5, label_smoothing=0.0,
                                 first_image_size=32, optimizer=optimizer)
        if aggregation:  # parameters per multi_sgd_mom_update (MXNET_OPTIMIZER_AGGREGATION_SIZE)
            learners[name].trainer.optimizer.aggregate_num = aggregation
        learners[name].step(data, label, 0.01)  # builds the graph and the optimizer state
    mx.nd.waitall()
    host = {name: [] for name in learners}
    done = {name: [] for name in learners}
    for _ in range(args.repeats):
        for name, learner in learners.items():
            with mx.autograd.record():  # fresh gradients (Trainer.step skips stale ones), not timed
                loss = learner.loss_fn(learner.net(data.copyto(learner.ctx)), label)
            loss.backward()
            mx.nd.waitall()
            start = time.perf_counter()
            learner.trainer.step(data.shape[0])
            issued = time.perf_counter()
            mx.nd.waitall()
            host[name].append(issued - start)
            done[name].append(time.perf_counter() - start)
    trainable = sum(1 for q in learners["nag"].net.collect_params().values() if q.grad_req != "null")
    print(f"{args.model}: {trainable} trainable parameters; median of {args.repeats} alternating repeats")
    print(f"{'optimizer':>9} {'host ms':>8} {'done ms':>8}")
    for name in learners:
        print(f"{name:>9} {1e3 * statistics.median(host[name]):>8.2f} {1e3 * statistics.median(done[name]):>8.2f}")
    for name in ("sgd-4", "sgd-60"):
        print(f"{name} / nag: host {statistics.median(host[name]) / statistics.median(host['nag']):.3f}, "
              f"done {statistics.median(done[name]) / statistics.median(done['nag']):.3f}")


if __name__ == "__main__":
    main()
