"""The baseline of bench_epoch.py: one epoch as Horovod's ImageNet example runs it on a CPU
(examples/pytorch/pytorch_imagenet_resnet50.py, read, not copied): an ImageFolder loader in
the training process, every step's loss and accuracy averaged across ranks, validation on a
DistributedSampler, a checkpoint written by rank 0 with plain ``torch.save``, TensorBoard
scalars per epoch, four threads per rank.

    mpirun -np 2 python bench/reference_epoch.py --train-dir T --val-dir V --log-dir L

Prints one line per phase, "phase NAME", as it starts, so that the benchmark can time each.
It imports Horovod directly, on purpose: it is the plain loop our job is measured against.
"""

from __future__ import annotations

import argparse

import horovod.torch as hvd
import torch
import torch.nn.functional as F
import torch.utils.data.distributed
from torch.utils.tensorboard import SummaryWriter
from torchvision import datasets, models, transforms

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def averaged(value: torch.Tensor, name: str) -> torch.Tensor:
    return hvd.allreduce(value.detach().cpu(), name=name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-dir", required=True)
    p.add_argument("--val-dir", required=True)
    p.add_argument("--log-dir", required=True)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--val-batch-size", type=int, default=32)
    p.add_argument("--base-lr", type=float, default=0.0125)
    p.add_argument("--threads", type=int, default=4)
    args = p.parse_args()

    hvd.init()
    torch.manual_seed(42)
    main_rank = hvd.rank() == 0
    say = (lambda what: print(f"phase {what}", flush=True)) if main_rank else (lambda what: None)
    writer = SummaryWriter(args.log_dir) if main_rank else None
    torch.set_num_threads(args.threads)

    size = args.image_size
    train_set = datasets.ImageFolder(
        args.train_dir,
        transforms.Compose(
            [
                transforms.RandomResizedCrop(size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        ),
    )
    val_set = datasets.ImageFolder(
        args.val_dir,
        transforms.Compose(
            [
                transforms.Resize(round(size / 0.875)),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        ),
    )
    train_sampler = torch.utils.data.distributed.DistributedSampler(train_set, num_replicas=hvd.size(), rank=hvd.rank())
    val_sampler = torch.utils.data.distributed.DistributedSampler(val_set, num_replicas=hvd.size(), rank=hvd.rank())
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.val_batch_size, sampler=val_sampler)

    model = models.get_model(args.model, weights=None, num_classes=len(train_set.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.base_lr * hvd.size(), momentum=0.9, weight_decay=5e-5)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    say("train")
    model.train()
    train_sampler.set_epoch(0)
    loss_sum = acc_sum = 0.0
    for images, labels in train_loader:
        optimizer.zero_grad()
        output = model(images)
        loss = F.cross_entropy(output, labels)
        loss_sum += averaged(loss, "train_loss").item()
        acc_sum += averaged(output.argmax(1).eq(labels).float().mean(), "train_accuracy").item()
        loss.backward()
        optimizer.step()
    say("validate")
    model.eval()
    val_loss = val_acc = 0.0
    with torch.no_grad():
        for images, labels in val_loader:
            output = model(images)
            val_loss += averaged(F.cross_entropy(output, labels), "val_loss").item()
            val_acc += averaged(output.argmax(1).eq(labels).float().mean(), "val_accuracy").item()
    say("checkpoint")
    if main_rank:
        writer.add_scalar("train/loss", loss_sum / len(train_loader), 0)
        writer.add_scalar("val/loss", val_loss / len(val_loader), 0)
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f"{args.log_dir}/checkpoint-1.pth.tar"
        )
        writer.close()
    say("end")


if __name__ == "__main__":
    main()
