"""compile=graph: each micro-batch's compiled forward + loss + backward replayed as one CUDA graph.

Why: the compiled step is bound by the host, not the GPU (bench/NOTES.md): Python, autograd and
~hundreds of kernel launches per micro-batch. A `torch.cuda.CUDAGraph` of the whole micro-batch
is one launch. Inductor's own graphs (compile=cudagraphs, mode="reduce-overhead") have open
failures with gradient accumulation upstream; a plain capture of forward + loss + backward, as
torchtitan does, keeps every tensor the step reads or writes at an address of our choosing.

What `MicroStepGraph(fn, params, device, capture=...)` keeps fixed, so that a replay is correct:
- inputs: the token ids (B, T) int64 and the loss scale () fp32 sit in buffers allocated once; a
  call copies its micro-batch into the ids buffer (no host sync: an async copy), and
  `begin_step(scale)` writes the step's 1/N (N = the step's target tokens) into the scale buffer,
  so a step of another N needs no new graph.
- gradients: every parameter's `.grad` exists before the first backward, outside any graph pool,
  and is zeroed in place between steps, never freed or replaced. The captured backward's
  AccumulateGrad then adds each micro-batch's gradient into it in place: A replays accumulate A
  micro-batches, and the norm, clipping and the optimizer (all outside the graph, as in the plain
  step) read and write the same buffers. `begin_step` puts a buffer back (zeroed) if something
  replaced or freed a parameter's `.grad`, and drops the graph (to capture again) if a parameter
  was reallocated: a replay would read or write the old memory.
- output: `fn` returns the micro-batch's summed token loss, () fp32, detached. After capture that
  tensor belongs to the graph and the next replay overwrites it: the caller consumes it (adds it
  to the step's sum) before the next call; stream order makes that safe without a sync.

The first `warmup` calls run `fn` directly, on a side stream on CUDA: torch.compile, autotuning,
cuBLAS handles and every lazy allocation happen there, not under capture. The next call captures
(`capture_error_mode="thread_local"`: a data-loader thread pinning memory meanwhile is no error)
and then replays. A micro-batch of another shape than the captured one runs `fn` directly. If the
capture raises (a host sync or an unsupported call inside `fn`), `log` gets one line and every
later call runs `fn` directly: the run goes on uncaptured.

With capture=False (a CPU has no CUDA graphs) `_DirectGraph` stands in for the CUDA graph: its
capture records the function and its replay calls it. Everything else above -- buffers, copy-in,
in-place accumulation, the scale, warmup, capture once, replay -- runs the same code, which is
what the CPU tests check against the plain step, bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

MicroStepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, scale) -> () loss


class _CudaGraph:
    """One torch.cuda.CUDAGraph of fn(): captured on `stream`, replayed on the current one."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.stream, self.graph, self.out = stream, torch.cuda.CUDAGraph(), None

    def capture(self, fn: Callable[[], torch.Tensor]) -> None:
        with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
            self.out = fn()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


class _DirectGraph:
    """The CPU stand-in for _CudaGraph: capture records fn, replay calls it."""

    def __init__(self) -> None:
        self.fn: Callable[[], torch.Tensor] | None = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> None:
        self.fn = fn

    def replay(self) -> torch.Tensor:
        return self.fn()


class MicroStepGraph:
    """Calls fn(ids, scale) for each micro-batch: `warmup` direct calls, then one capture, then
    replays (see the module docstring). `params` are the tensors whose `.grad` fn's backward
    accumulates into; each must already have one. Counters for tests and benchmarks: `captures`,
    `replays`, and `failure` (the line logged when a capture failed, else None)."""

    def __init__(
        self,
        fn: MicroStepFn,
        params: list[torch.Tensor],
        device: torch.device,
        *,
        capture: bool,
        log: Callable[[str], None],
        warmup: int = 2,
        make_graph: Callable[[], _CudaGraph | _DirectGraph] | None = None,
    ) -> None:
        if any(p.grad is None for p in params):
            raise ValueError("MicroStepGraph needs every parameter's .grad allocated beforehand")
        self._fn, self._params, self._log, self._warmup = fn, params, log, warmup
        self._grads = [p.grad for p in params]
        self._stream = torch.cuda.Stream(device) if capture else None
        if make_graph is None:
            make_graph = (lambda: _CudaGraph(self._stream)) if capture else _DirectGraph
        self._make_graph = make_graph
        self._ids: torch.Tensor | None = None  # (B, T) int64, allocated at the first call
        self._scale = torch.zeros((), dtype=torch.float32, device=device)
        self._graph: _CudaGraph | _DirectGraph | None = None
        self._addresses: list[int] = []
        self._warmup_left = warmup
        self.captures, self.replays = 0, 0
        self.failure: str | None = None

    def begin_step(self, scale: float | torch.Tensor) -> None:
        """Before a step's first micro-batch: the loss scale 1/N into its buffer; the gradient
        buffers back where something replaced them; the graph dropped if a parameter moved."""
        if isinstance(scale, torch.Tensor):
            self._scale.copy_(scale, non_blocking=True)
        else:
            self._scale.fill_(scale)
        for p, g in zip(self._params, self._grads):
            if p.grad is not g:  # freed or replaced (e.g. zero_grad(set_to_none=True))
                p.grad = g.zero_()
        if self._graph is not None and self._addresses != [p.data_ptr() for p in self._params]:
            self._graph, self._warmup_left = None, self._warmup  # weights reallocated

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """One micro-batch (B, T) int64 (any device): its forward, loss and backward; returns its
        summed token loss, () fp32, valid until the next call."""
        if self._ids is None or (self._graph is None and self._ids.shape != ids.shape):
            self._ids = torch.empty(ids.shape, dtype=ids.dtype, device=self._scale.device)
        elif self._ids.shape != ids.shape:  # not the captured shape: uncaptured, as it comes
            return self._fn(ids.to(self._ids.device, non_blocking=True), self._scale)
        self._ids.copy_(ids, non_blocking=True)
        if self._graph is None and self.failure is None:
            if self._warmup_left > 0:
                self._warmup_left -= 1
                with self._on_side_stream():
                    return self._fn(self._ids, self._scale)
            self._capture()
        if self._graph is None:  # the capture failed: the run goes on uncaptured
            return self._fn(self._ids, self._scale)
        self.replays += 1
        return self._graph.replay()

    def _capture(self) -> None:
        graph = self._make_graph()
        try:
            graph.capture(lambda: self._fn(self._ids, self._scale))
        except Exception as e:  # whatever stops a capture, the run must go on without one
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.failure = (f"compile 'graph': capturing the micro-batch as a CUDA graph failed "
                            f"({type(e).__name__}: {reason[:200]}); continuing without CUDA "
                            "graphs, as compile on")  # fmt: skip
            self._log(self.failure)
            return
        self._graph = graph
        self._addresses = [p.data_ptr() for p in self._params]
        self.captures += 1

    def _on_side_stream(self) -> contextlib.AbstractContextManager:
        """Warmup runs on the capture's side stream (CUDA), ordered after and before the current
        stream's work; on a CPU, where it is."""
        if self._stream is None:
            return contextlib.nullcontext()
        return _side_stream(self._stream)


@contextlib.contextmanager
def _side_stream(stream: torch.cuda.Stream):
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)
