"""Job scripts for SLURM and PBS Pro: render the templates in ``templates/`` for one
run, and submit them, as one job or as a chain of jobs that carries a long run across allocations.

    python -m largebatch.jobs render --scheduler slurm --nodes 2 --gpus-per-node 4 \\
        --time 24:00:00 --account proj -- --train-dir /data/train --val-dir /data/val \\
        --log-dir runs/r50 --base-op lars

The training job itself checkpoints and exits when signalled (largebatch/stop.py); the
scripts decide from the run's status.json whether to requeue or let the next job continue.
"""
