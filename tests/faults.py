"""A worker that dies mid-run, for the end-to-end training test (tests/test_e2e.py).

The fault comes from the test side: the worker loop is wrapped (Ray ships the closure to the workers)
so that rank 0's process exits once, two optimizer steps after the first checkpoint of the second
epoch, as a node losing a worker would. The production loop has no hook for it.
"""


SCORES = (0.5, 0.25, 0.25)  # the held-out score of epochs 1-3
STEPS_AFTER_CHECKPOINT = 2  # steps rank 0 trains after the checkpoint it dies past


def dies_after_a_checkpoint_in_epoch_two(marker: str):
    """The real worker loop, but rank 0's process exits as it starts its third optimizer step after the
    first checkpoint written after the first epoch's held-out score, the first time only (the marker file
    remembers). The steps it trained past that checkpoint are the ones a resumed run trains again. The
    held-out scores are SCORES."""
    from memo.training import loop

    real_loop = loop.train_loop_per_worker

    def loop_that_dies(cfg):
        import os
        import time

        import ray.train

        from memo.training import loop as worker_loop

        real_step, real_score, real_report = worker_loop.accumulation_step, worker_loop.selection_recall, ray.train.report
        # epochs scored so far: none in the first process, epoch 1 in the resumed one
        scored = [1 if os.path.exists(marker) else 0]
        since_checkpoint = [None]  # optimizer steps since a checkpoint of epoch 2 or later

        def score(*args, **kw):
            # the real scoring runs on every rank (an FSDP forward needs both); its value on a random tiny
            # model says nothing, so the epochs' scores are given: epoch 1 best, then worse
            real_score(*args, **kw)
            scored[0] += 1
            return SCORES[scored[0] - 1]

        def report(metrics, checkpoint=None, **kw):
            real_report(metrics, checkpoint=checkpoint, **kw)
            if checkpoint is not None and scored[0] > 0 and "train_seconds" not in metrics and since_checkpoint[0] is None:
                since_checkpoint[0] = 0

        def step_or_die(*args, **kw):
            if since_checkpoint[0] is not None:
                if (since_checkpoint[0] == STEPS_AFTER_CHECKPOINT and not os.path.exists(marker)
                        and ray.train.get_context().get_world_rank() == 0):
                    open(marker, "w").close()
                    # The controller collects reported checkpoints on its health check (every 2 s): dying
                    # within that window would lose the last one, so wait past it first.
                    time.sleep(5)
                    os._exit(1)
                since_checkpoint[0] += 1
            return real_step(*args, **kw)

        worker_loop.accumulation_step, worker_loop.selection_recall, ray.train.report = step_or_die, score, report
        return real_loop(cfg)

    return loop_that_dies
