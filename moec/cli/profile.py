"""``moec profile SPEC --tokens N``: run a model on random inputs and record its routing (tokens
per expert and consecutive-layer expert pairs, per MoE layer and window) as a routing trace.

Contract: ``profile_main(opts)`` loads the model (``moec.models.spec``), runs ``--tokens`` tokens
split evenly over ``--windows`` windows (the first ``N % W`` windows get one more) eagerly, with
its MoE layers converted and recorded by ``moec.runtime.profiler.RoutingProfiler.recording``.
Each forward takes ``--batch`` sequences of ``--seq-len`` tokens (default: the example input's
sequence length); a window's last forwards are smaller so that every window holds exactly its
tokens. Inputs are random and seeded by ``--seed``: an integer input (token ids) is drawn in
[0, vocab) (``config.vocab_size``, else the example's largest value + 1), an all-ones integer input
(an attention mask) stays ones, a float input is standard normal. Every input must be shaped
[batch, sequence, ...] like the example. It prints one line per MoE layer (slots, max/mean load
over all windows, the top experts and their share of the slots) and writes the trace to ``--out``
(default ``moec-trace-<name>.npz``), in the format of ``moec.runtime.trace``. A problem the user
can fix raises ``ProfileError`` (one line; ``moec`` exits 2).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator

import torch

DEFAULT_TOKENS = 4096
DEFAULT_WINDOWS = 4
DEFAULT_BATCH = 8
TOP_EXPERTS_SHOWN = 3


class ProfileError(Exception):
    """A bad option value or model for ``moec profile``; the message is one line."""


def add_arguments(p: argparse.ArgumentParser, spec_help: str) -> None:
    p.add_argument("spec", nargs="?", metavar="SPEC", help=spec_help)
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, metavar="N",
                   help="tokens to run in all, split evenly over the windows (default: %(default)s)")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, metavar="W",
                   help="windows the trace is split into (default: %(default)s)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, metavar="B",
                   help="sequences per forward call (default: %(default)s)")
    p.add_argument("--seq-len", type=int, metavar="S",
                   help="tokens per sequence (default: the example input's sequence length)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: %(default)s)")
    p.add_argument("--out", metavar="FILE", help="trace file to write (default: moec-trace-<name>.npz)")


def _check(opts) -> None:
    for flag, value in (("--tokens", opts.tokens), ("--windows", opts.windows), ("--batch", opts.batch)):
        if value < 1:
            raise ProfileError(f"{flag} must be at least 1, got {value}")
    if opts.seq_len is not None and opts.seq_len < 1:
        raise ProfileError(f"--seq-len must be at least 1, got {opts.seq_len}")
    if opts.tokens < opts.windows:
        raise ProfileError(f"--tokens {opts.tokens} is fewer than --windows {opts.windows}: every window "
                           "needs at least one token")


def window_sizes(tokens: int, windows: int) -> list[int]:
    """Tokens per window: ``tokens`` split evenly, the first ``tokens % windows`` one larger."""
    return [tokens // windows + (w < tokens % windows) for w in range(windows)]


def forward_shapes(tokens: int, batch: int, seq_len: int) -> Iterator[tuple[int, int]]:
    """(sequences, length) of the forwards that run exactly ``tokens`` tokens."""
    per_call = batch * seq_len
    for _ in range(tokens // per_call):
        yield batch, seq_len
    rest = tokens % per_call
    if rest >= seq_len:
        yield rest // seq_len, seq_len
    if rest % seq_len:
        yield 1, rest % seq_len


class _Inputs:
    """Random inputs shaped like the example's, [batch, sequence, ...]."""

    def __init__(self, model: torch.nn.Module, example: tuple, seed: int, spec: str) -> None:
        self.example = example
        self.generator = torch.Generator().manual_seed(seed)
        tensors = [a for a in example if isinstance(a, torch.Tensor)]
        if not tensors or any(a.dim() < 2 for a in tensors):
            shapes = [tuple(a.shape) for a in tensors]
            raise ProfileError(f"{spec}: moec profile needs inputs shaped [batch, sequence, ...]; the example "
                               f"inputs have shapes {shapes}")
        self.seq_len = tensors[0].shape[1]
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        self.vocab = vocab if isinstance(vocab, int) and vocab > 0 else None

    def make(self, batch: int, seq_len: int) -> tuple:
        args = []
        for a in self.example:
            if not isinstance(a, torch.Tensor):
                args.append(a)
                continue
            shape = (batch, seq_len, *a.shape[2:])
            if a.is_floating_point():
                args.append(torch.randn(shape, generator=self.generator, dtype=a.dtype).to(a.device))
            elif bool((a == 1).all()):
                args.append(torch.ones(shape, dtype=a.dtype, device=a.device))
            else:
                high = self.vocab or int(a.max()) + 1
                args.append(torch.randint(0, high, shape, generator=self.generator, dtype=a.dtype).to(a.device))
        return tuple(args)


def profile_main(opts) -> int:
    from moec.models.spec import load_spec
    from moec.runtime.profiler import RoutingProfiler
    from moec.runtime.trace import TraceError

    _check(opts)
    with contextlib.redirect_stdout(sys.stderr):  # chatter from model code stays off stdout
        model, example, name = load_spec(opts.spec)
        inputs = _Inputs(model, example, opts.seed, opts.spec)
        seq_len = opts.seq_len or inputs.seq_len
        profiler = RoutingProfiler(source=f"profile:{opts.spec}")
        if not profiler.bind(model):
            raise ProfileError(f"no MoE layer found in {opts.spec} (`moec inspect {opts.spec}` says why)")
        sizes = window_sizes(opts.tokens, opts.windows)
        with torch.no_grad(), profiler.recording(model):
            for w, tokens in enumerate(sizes):
                if w:
                    profiler.next_window()
                for batch, length in forward_shapes(tokens, opts.batch, seq_len):
                    model(*inputs.make(batch, length))
    try:
        trace = profiler.trace()
    except TraceError as e:
        raise ProfileError(f"{opts.spec}: {e}") from None
    trace.meta.update(tokens=opts.tokens, windows=opts.windows, batch=opts.batch, seq_len=seq_len, seed=opts.seed)
    out = opts.out or f"moec-trace-{name}.npz"
    try:
        path = trace.save(out)
    except OSError as e:
        raise ProfileError(f"cannot write the trace to {out}: {e.strerror or e}") from None
    print(f"moec profile {opts.spec}: {trace.num_layers} MoE layer(s), {trace.num_experts} experts, "
          f"top-{trace.top_k}, {opts.tokens} tokens in {trace.num_windows} window(s) of {sizes[0]}"
          f"{'' if len(set(sizes)) == 1 else f'/{sizes[-1]}'}, forwards of {opts.batch} x {seq_len}")
    print(summary_table(trace))
    print(f"trace written to {path}")
    return 0


def summary_table(trace) -> str:
    """One row per layer over all windows: slots, max/mean load, top experts with their share."""
    import numpy as np

    load_LE = trace.load_WLE.sum(axis=0)
    names = trace.meta.get("layer_names") or [str(l) for l in range(trace.num_layers)]
    heads = ["layer", "slots", "max/mean", "top experts (share of slots)"]
    body = []
    for name, load_E in zip(names, load_LE):
        total = int(load_E.sum())
        mean = total / len(load_E)
        top = np.argsort(-load_E, kind="stable")[:TOP_EXPERTS_SHOWN]
        shares = ", ".join(f"{int(e)} ({load_E[e] / total:.1%})" for e in top) if total else "-"
        body.append([name, str(total), f"{load_E.max() / mean:.2f}" if total else "-", shares])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)
