"""What both training scripts need around their loop: DDP start and stop under torchrun, atomic checkpoints, and the
random-number state a checkpoint carries so that a resumed run repeats an uninterrupted one exactly (on a CPU).

    ddp, rank, world, device = start(args.device)
    ...
    stop(ddp)
"""
import os
import time

import torch
import torch.distributed as dist


def start(device_name):
    """-> (ddp, rank, world, device). Under torchrun (RANK is set) one process per GPU joins the process group:
    NCCL on CUDA, gloo on the CPU; without it, one process."""
    ddp = 'RANK' in os.environ
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    device = torch.device(device_name)
    if ddp:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        if device.type == 'cuda':
            device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
            torch.cuda.set_device(device)
    return ddp, rank, world, device


def stop(ddp):
    """Leave together: a rank that tears gloo down while rank 0 still saves can abort at exit."""
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def save(path, state):
    """torch.save to a temporary name, then rename: a crash while writing never leaves a half-written file."""
    torch.save(state, f'{path}.tmp')
    os.replace(f'{path}.tmp', path)


def resume_point(out, resume):
    """Create OUT; -> (OUT/last.pt, the path to continue from or None, its checkpoint or None). resume: None, a path,
    or 'auto' (OUT/last.pt if it exists). Loaded with weights_only=True: tensors and plain types, never code."""
    os.makedirs(out, exist_ok=True)
    last = os.path.join(out, 'last.pt')
    path = (last if os.path.exists(last) else None) if resume == 'auto' else resume
    return last, path, (torch.load(path, map_location='cpu', weights_only=True) if path else None)


def keep_log_lines(path, keep, header=0):
    """Before a run writes to its log: keep the lines `keep(line)` accepts (those up to the resumed checkpoint; none
    for a fresh run) under the first `header` lines, or remove the file when none is kept (the run writes its own
    header), so that a log holds one run: no other run's lines, no steps a resumed run repeats."""
    if not os.path.exists(path):
        return
    lines = open(path).read().splitlines()
    kept = [s for s in lines[header:] if keep(s)]
    if not kept:
        os.remove(path)
        return
    with open(path, 'w') as f:
        f.write(''.join(s + '\n' for s in lines[:header] + kept))


def rng_state(**generators):
    """The torch CPU (and CUDA) RNG states plus those of named torch.Generators, for a checkpoint."""
    state = {'torch': torch.get_rng_state(), **{k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, **generators):
    torch.set_rng_state(state['torch'])
    for k, g in generators.items():
        g.set_state(state[k])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def epochs_in_budget(minutes, t_start, epoch, ddp):
    """--time: after epoch `epoch` (0-based) of a run whose clock started at `t_start` (a resumed run moves it back
    by the seconds its checkpoint had spent, so the budget is the whole run's), the number of epochs that fit in
    `minutes` at the mean time per epoch so far (at least epoch + 1; exactly that once the budget is spent). Under
    DDP rank 0's clock decides, so that every rank stops together."""
    spent = time.time() - t_start
    per_epoch = spent / (epoch + 1)
    fit = torch.tensor(epoch + 1 if spent >= minutes * 60 else max(epoch + 1, int(minutes * 60 / per_epoch)))
    if ddp:
        dist.broadcast(fit, 0)
    return int(fit)
