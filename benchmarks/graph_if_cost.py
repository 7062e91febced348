"""What a CUDA-graph IF node costs on this GPU and driver: the measurement behind leaving the sparse
decode kernels unconditionally in vLLM's FULL graphs (issue 16).

The idea tested: at 32 x 8K every request is under `dense_below`, yet a FULL graph replays the decode
kernels of every layer (they find no sparse row and return). Put them in the body of a conditional
(IF) node (CUDA 12.4+), with a one-thread kernel before it that sets the condition from a device flag,
and steps without a sparse row would skip them. torch 2.13 exposes this as
`CUDAGraph.begin_capture_to_if_node`; the GPU image's torch 2.11 does not, so this reaches the driver
through cuda-python (`cuda.bindings` 13), as the plugin would have.

Graph per "layer": a bf16 GEMM [32, 4096] x [4096, 4096] (a stand-in for the model's work), then K
early-exit Triton kernels (the decode kernels' cost when no row is sparse), captured:
  plain               the kernels as they are (what the engine does)
  setter + IF off/on  the setter kernel, then the kernels in an IF node, flag 0 / 1
  IF off/on           the IF node alone (condition fixed at capture: no setter)
  IF empty, off       an IF node with nothing in it
Time per layer from CUDA events over replays of the whole graph (L layers). Before timing, the IF
graph is checked: its body writes only when the flag is set.

    python benchmarks/graph_if_cost.py --out $OUT/graph_if_cost.json
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import triton
import triton.language as tl

SETTER_NAME = "vllm_sparse_set_if"
SETTER_PTX = r"""
.version 7.0
.target sm_70
.address_size 64

.extern .func cudaGraphSetConditional(.param .b64 handle, .param .b32 value);

.visible .entry vllm_sparse_set_if(.param .u64 flag_ptr, .param .u64 handle_value)
{
    .reg .pred %p;
    .reg .b32 %r<3>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [flag_ptr];
    ld.param.u64 %rd2, [handle_value];
    cvta.to.global.u64 %rd3, %rd1;
    ld.global.u32 %r1, [%rd3];
    setp.ne.u32 %p, %r1, 0;
    selp.u32 %r2, 1, 0, %p;
    {
        .param .b64 h;
        .param .b32 v;
        st.param.b64 [h], %rd2;
        st.param.b32 [v], %r2;
        call.uni cudaGraphSetConditional, (h, v);
    }
    ret;
}
"""


class ConditionalUnavailable(RuntimeError):
    pass


def _check(result):
    """cuda.bindings returns (CUresult, *values): the values, or raise naming the call's error."""
    from cuda.bindings import driver

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise ConditionalUnavailable(name.decode() if isinstance(name, bytes) else str(err))
    return values[0] if len(values) == 1 else values


def device_runtime_libraries() -> list[str]:
    """libcudadevrt.a files this machine has (CUDA toolkit, or the pip-installed NVIDIA packages)."""
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    roots += [os.path.join(p, "nvidia") for p in sys.path if os.path.isdir(os.path.join(p, "nvidia"))]
    found = []
    for root in filter(None, roots):
        found += glob.glob(os.path.join(root, "**", "libcudadevrt.a"), recursive=True)
    return sorted(set(found))


def _load_setter(driver):
    """The setter kernel: the PTX loaded as it is, else linked with the device runtime library."""
    ptx = SETTER_PTX.encode() + b"\0"
    try:
        module = _check(driver.cuModuleLoadData(ptx))
        return _check(driver.cuModuleGetFunction(module, SETTER_NAME.encode())), "PTX"
    except ConditionalUnavailable as direct:
        libs = device_runtime_libraries()
        if not libs:
            raise ConditionalUnavailable(f"the driver does not resolve cudaGraphSetConditional in PTX ({direct}) "
                                         "and no libcudadevrt.a was found to link it with") from None
    link = _check(driver.cuLinkCreate(0, [], []))
    try:
        _check(driver.cuLinkAddData(link, driver.CUjitInputType.CU_JIT_INPUT_PTX, ptx, len(ptx), b"set_if.ptx",
                                    0, [], []))
        _check(driver.cuLinkAddFile(link, driver.CUjitInputType.CU_JIT_INPUT_LIBRARY, libs[0].encode(), 0, [], []))
        cubin, size = _check(driver.cuLinkComplete(link))
        image = ctypes.string_at(int(cubin), size)  # (owned by the link state: copied before it goes)
    finally:
        driver.cuLinkDestroy(link)
    module = _check(driver.cuModuleLoadData(image))
    return _check(driver.cuModuleGetFunction(module, SETTER_NAME.encode())), f"PTX linked with {libs[0]}"


class _Conditional:
    """What one device needs to capture IF nodes: the setter kernel and a stream to capture bodies on."""

    def __init__(self, device: torch.device):
        import cuda.bindings
        from cuda.bindings import driver

        self.driver = driver
        self.bindings_version = cuda.bindings.__version__
        if int(self.bindings_version.split(".")[0]) < 13:  # 13: the capture calls carry edge data
            raise ConditionalUnavailable(f"cuda.bindings {self.bindings_version}; this script uses the 13.x API")
        _check(driver.cuInit(0))
        version = self.driver_version = _check(driver.cuDriverGetVersion())
        if version < 12040:
            raise ConditionalUnavailable(f"the CUDA driver is {version // 1000}.{version % 1000 // 10}; "
                                         "conditional graph nodes need 12.4")
        with torch.cuda.device(device):
            torch.cuda.synchronize(device)  # the primary context exists and is current from here on
            self.setter, self.how = _load_setter(driver)
            self.body_stream = torch.cuda.Stream(device)  # made now: not while a graph captures

    def capture_info(self, stream):
        """(graph, dependencies, their edge data or None) of the capture under way on stream."""
        _, _, graph, deps, edges, n = _check(self.driver.cuStreamGetCaptureInfo(stream))
        return graph, list(deps)[:n], (list(edges)[:n] if edges else None)

    def add_if_node(self, stream, flag: torch.Tensor | None, default: int = 0):
        """Under the capture on `stream`: the setter kernel, then an IF node after it; the stream's
        later work depends on the node. -> the node's body graph. (flag None: no setter, the
        condition stays `default`; for measuring the node's own cost.)"""
        d = self.driver
        graph, _, _ = self.capture_info(stream)
        ctx = _check(d.cuCtxGetCurrent())
        handle = _check(d.cuGraphConditionalHandleCreate(graph, ctx, default, d.CU_GRAPH_COND_ASSIGN_DEFAULT))
        if flag is not None:
            args = ((flag.data_ptr(), int(handle)), (ctypes.c_void_p, ctypes.c_uint64))
            _check(d.cuLaunchKernel(self.setter, 1, 1, 1, 1, 1, 1, 0, stream, args, 0))
        graph, deps, edges = self.capture_info(stream)  # now ending in the setter
        params = d.CUgraphNodeParams()
        params.type = d.CUgraphNodeType.CU_GRAPH_NODE_TYPE_CONDITIONAL
        params.conditional.handle = handle
        params.conditional.type = d.CUgraphConditionalNodeType.CU_GRAPH_COND_TYPE_IF
        params.conditional.size = 1
        params.conditional.ctx = ctx
        set_deps = d.CUstreamUpdateCaptureDependencies_flags.CU_STREAM_SET_CAPTURE_DEPENDENCIES
        node = _check(d.cuGraphAddNode(graph, deps, edges, len(deps), params))
        _check(d.cuStreamUpdateCaptureDependencies(stream, [node], None, 1, set_deps))
        return params.conditional.phGraph_out[0]

    def begin_body(self, body) -> None:
        d = self.driver
        mode = d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        _check(d.cuStreamBeginCaptureToGraph(d.CUstream(self.body_stream.cuda_stream), body, None, None, 0, mode))

    def end_body(self) -> None:
        _check(self.driver.cuStreamEndCapture(self.driver.CUstream(self.body_stream.cuda_stream)))




@triton.jit
def _early_exit_kernel(rows_ptr, out_ptr):
    r = tl.load(rows_ptr + tl.program_id(0))
    if r > 1000000:  # never, as with no sparse decode row
        tl.store(out_ptr + tl.program_id(0), r)


def capture(cond: _Conditional, layers: int, kernels: int, programs: int, mode: str, flag=None,
            with_kernels: bool = True) -> torch.cuda.CUDAGraph:
    dev = flag.device if flag is not None else torch.device("cuda")
    rows = torch.zeros(programs, dtype=torch.int32, device=dev)
    out = torch.zeros_like(rows)
    x = torch.randn(32, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    _early_exit_kernel[(programs,)](rows, out)
    _ = x @ w  # cuBLAS and Triton ready before the capture
    torch.cuda.synchronize()

    @contextmanager
    def body():
        if mode == "plain":
            yield
            return
        stream = cond.driver.CUstream(torch.cuda.current_stream().cuda_stream)
        graph = cond.add_if_node(stream, flag if mode == "setter" else None, default=int(mode == "if-on"))
        cond.begin_body(graph)
        try:
            with torch.cuda.stream(cond.body_stream):
                yield
        finally:
            cond.end_body()

    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(layers):
            _ = x @ w
            with body():
                for _ in range(kernels if with_kernels else 0):
                    _early_exit_kernel[(programs,)](rows, out)
    g.keep = (rows, out, x, w)
    return g


def check_if_node(cond: _Conditional) -> None:
    """The IF node's body runs exactly on replays whose flag is set."""
    dev = torch.device("cuda")
    flag = torch.zeros(1, dtype=torch.int32, device=dev)
    x = torch.randn(4096, device=dev)
    out = torch.full_like(x, float("nan"))
    g = torch.cuda.CUDAGraph()
    x.mul_(1.0)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        stream = cond.driver.CUstream(torch.cuda.current_stream().cuda_stream)
        cond.begin_body(cond.add_if_node(stream, flag))
        try:
            with torch.cuda.stream(cond.body_stream):
                torch.mul(x, 2.0, out=out)
        finally:
            cond.end_body()
    for f in (0, 1, 0, 1):
        x.copy_(torch.randn_like(x))
        before = out.clone()
        flag.fill_(f)
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, x * 2.0 if f else before, equal_nan=True)


def per_layer_us(g: torch.cuda.CUDAGraph, layers: int, replays: int = 300) -> float:
    for _ in range(10):
        g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(replays):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / replays * 1000 / layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kernels", type=int, default=5, help="early-exit kernels per layer (the decode path has 5)")
    ap.add_argument("--programs", default="1024,32", help="programs per kernel, comma-separated cases")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="graph_if_cost.json")
    args = ap.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    cond = _Conditional(dev)
    check_if_node(cond)
    flag = torch.zeros(1, dtype=torch.int32, device=dev)
    L, K = args.layers, args.kernels
    results = {"device": torch.cuda.get_device_name(), "driver": cond.driver_version, "setter": cond.how,
               "torch": torch.__version__, "cuda_bindings": cond.bindings_version, "layers": L, "kernels": K,
               "cases": []}
    for programs in (int(p) for p in args.programs.split(",")):
        for rep in range(args.repeats):
            row = {"programs": programs, "repeat": rep}
            row["gemm only"] = per_layer_us(capture(cond, L, K, programs, "plain", with_kernels=False), L)
            row["plain"] = per_layer_us(capture(cond, L, K, programs, "plain"), L)
            g = capture(cond, L, K, programs, "setter", flag)
            flag.fill_(0)
            row["setter + IF, off"] = per_layer_us(g, L)
            flag.fill_(1)
            row["setter + IF, on"] = per_layer_us(g, L)
            row["IF, off"] = per_layer_us(capture(cond, L, K, programs, "if-off"), L)
            row["IF, on"] = per_layer_us(capture(cond, L, K, programs, "if-on"), L)
            row["IF empty, off"] = per_layer_us(capture(cond, L, K, programs, "if-off", with_kernels=False), L)
            results["cases"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    cols = [k for k in results["cases"][0] if k not in ("programs", "repeat")]
    print(f"\n{results['device']}, driver {cond.driver_version}, torch {torch.__version__}: us per layer "
          f"(GEMM + {K} early-exit kernels), {L} layers per graph")
    print(f"{'programs':>8} " + " ".join(f"{c:>17}" for c in cols))
    for r in results["cases"]:
        print(f"{r['programs']:>8} " + " ".join(f"{r[c]:>17.2f}" for c in cols))


if __name__ == "__main__":
    main()
