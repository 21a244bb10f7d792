"""A worker that dies mid-run, for the end-to-end training test (tests/test_e2e.py).

The fault comes from the test side: the worker loop is wrapped (Ray ships the closure to the workers)
so that rank 0's process exits once, a few steps into the second epoch, as a node losing a worker
would. The production loop has no hook for it.
"""


SCORES = (0.5, 0.25, 0.25)  # the held-out score of epochs 1-3


def dies_once_in_epoch_two(steps_in: int, marker: str):
    """The real worker loop, but rank 0's process exits when it starts its `steps_in`-th optimizer step
    after the first epoch's held-out score, the first time only (the marker file remembers), as a node
    losing a worker would. The held-out scores are SCORES."""
    from memo.training import loop

    real_loop = loop.train_loop_per_worker

    def loop_that_dies(cfg):
        import os
        import time

        import ray.train

        from memo.training import loop as worker_loop

        real_step, real_score, calls = worker_loop.accumulation_step, worker_loop.selection_recall, [0]
        # epochs scored so far: none in the first process, epoch 1 in the one restarted in epoch 2
        scored = [1 if os.path.exists(marker) else 0]

        def score(*args, **kw):
            # the real scoring runs on both ranks (an FSDP forward needs both); its value on a random tiny
            # model says nothing, so the epochs' scores are given: epoch 1 best, then worse
            real_score(*args, **kw)
            scored[0] += 1
            return SCORES[scored[0] - 1]

        def step_or_die(*args, **kw):
            calls[0] += scored[0] > 0
            if calls[0] == steps_in and not os.path.exists(marker) and ray.train.get_context().get_world_rank() == 0:
                open(marker, "w").close()
                # The controller collects reported checkpoints on its health check (every 2 s): dying
                # within that window would lose the last one, so wait past it first.
                time.sleep(5)
                os._exit(1)
            return real_step(*args, **kw)

        worker_loop.accumulation_step, worker_loop.selection_recall = step_or_die, score
        return real_loop(cfg)

    return loop_that_dies
