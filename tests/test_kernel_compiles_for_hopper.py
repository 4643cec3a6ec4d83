"""The select kernels compile for Hopper (sm_90) without a GPU, and without register spills.

Triton compiles ahead of time for a named target: its NVIDIA backend (in the triton wheel)
lowers each kernel to PTX and runs ``ptxas`` on it, no driver needed. Each kernel is compiled
with the block sizes :func:`launch_plan` picks on a 132-SM GPU (H100 SXM / H200) for the
benchmark's extreme shapes, and ``ptxas -v`` must report no spill. This is what the
interpreter cannot show: that the compiled kernels build, and how heavy they are. Whether they
are fast is only measured on a GPU (``benchmarks/kernel_select.py``).

The compilation runs in one subprocess with ``TRITON_INTERPRET=0`` (the test session
interprets kernels, and an interpreted kernel cannot be compiled).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
HOPPER_SMS = 132
# (tokens, kept, row width, scored width, per-image w/c): the benchmark's extremes at 7B
# geometry, and Qwen3-VL-like rows (main + 3 deepstack levels) with per-image parameters.
SHAPES = [
    (1024, 205, 3584, 3584, False),
    (32 * 16384, 32 * 3277, 3584, 3584, False),
    (8 * 1024, 8 * 205, 4 * 2048, 2048, True),
]
KERNELS = ("score", "select", "gather")

_COMPILE = textwrap.dedent(
    """
    import json, os, re, subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from vs_vllm.kernels import score_select_triton as k

    ptxas, sms, shapes = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])

    def build(fn, signature, constexprs, warps):
        names = [*signature, *constexprs]
        if names != list(fn.arg_names):
            raise SystemExit(f"arguments of {fn.__name__} changed: {fn.arg_names}")
        sig = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(out.asm["ptx"])
        run = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
        os.unlink(f.name)
        regs = int(re.search(r"Used (\\d+) registers", run.stderr).group(1))
        spills = sum(int(v) for v in re.findall(r"(\\d+) bytes spill (?:stores|loads)", run.stderr))
        return {"regs": regs, "spills": spills, "constexprs": constexprs, "warps": warps}

    report = []
    for tokens, kept, hidden, score_dim, per_image in shapes:
        p = k.launch_plan(tokens, kept, hidden, score_dim, sms)
        row = {}
        row["score"] = build(k._score_kernel, dict(
            x_ptr="*bf16", stride_x="i64", scores_ptr="*fp32", w_ptr="*fp32", stride_w="i64",
            c_ptr="*fp32", stride_c="i64", cu_ptr="*i32", num_tokens="i32", num_images="i32",
            search_steps="i32", S="i32"),
            dict(SHARED_W=not per_image, SHARED_C=not per_image, BLOCK_M=p.block_m,
                 BLOCK_SD=p.block_sd), p.score_warps)
        row["select"] = build(k._select_kernel, dict(
            scores_ptr="*fp32", cu_ptr="*i32", keep_ptr="*i32", out_idx_ptr="*i64",
            src_ptr="*i64"), dict(BLOCK_T=p.block_t, BLOCK_B=128), 8)
        row["gather"] = build(k._gather_kernel, dict(
            x_ptr="*bf16", stride_x="i64", src_ptr="*i64", out_rows_ptr="*bf16",
            stride_o="i64", total_kept="i32", D="i32"),
            dict(BLOCK_K=p.block_k, BLOCK_C=p.block_c), p.gather_warps)
        report.append(row)
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def hopper_build() -> list[dict]:
    if not os.path.exists(PTXAS):
        pytest.skip("this triton wheel has no NVIDIA backend (ptxas)")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE, PTXAS, str(HOPPER_SMS), json.dumps(SHAPES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "shape", range(len(SHAPES)), ids=lambda i: "{0}tok-D{2}-sd{3}".format(*SHAPES[i])
)
def test_kernel_compiles_for_sm90_without_spills(hopper_build, shape, kernel):
    got = hopper_build[shape][kernel]
    assert got["spills"] == 0, f"{kernel} spills {got['spills']} bytes: {got}"
    assert got["regs"] <= 255
    if kernel != "select":  # the streaming kernels leave room for several programs per SM
        assert got["regs"] <= 128, f"{kernel}: {got}"
