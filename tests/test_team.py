"""Every parallel C++ kernel runs on ``qru::Team`` (qru/csrc/qru_common.h): the same bits at any
thread count, each agreeing with its pure-torch reference; and the team survives ``fork``."""
import multiprocessing as mp
import os
import time

import pytest
import torch

from qru.kernels import (bf16_linear, causal_attention, decode_attention, linear_logprobs, lora, qmatmul,
                         quant4, rmsnorm, rope, swiglu, token_stats)
from qru.kernels import threads
from qru.kernels._backend import load_cpp_ext

pytestmark = pytest.mark.skipif(load_cpp_ext("llama_ops") is None, reason="no C++ compiler")


def _close(a, b, tol):
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def _run_all(dt):
    """Each ported kernel on inputs large enough for a team (>= 64K values of work), forward and
    backward where it has one. Returns {name: [tensors]} and checks each against its reference."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dt)  # noqa: E731
    tol = 1e-5 if dt == torch.float32 else 2e-2
    out = {}

    x, w = r(256, 512).requires_grad_(), r(512).requires_grad_()
    y = rmsnorm.rms_norm(x, w, 1e-6)
    y.backward(r(256, 512))
    _close(y, rmsnorm.rms_norm_reference(x.detach(), w.detach(), 1e-6), tol)
    out["rmsnorm"] = [y.detach(), x.grad, w.grad]

    q, c, s = r(2, 128, 8, 64), torch.randn(2, 128, 64, generator=g), torch.randn(2, 128, 64, generator=g)
    yq = rope.rope(q, c, s)
    _close(yq, rope.rope_reference(q, c, s).to(yq.dtype), tol)
    out["rope"] = [yq]

    a, b = r(256, 1024).requires_grad_(), r(256, 1024).requires_grad_()
    ys = swiglu.swiglu(a, b)
    ys.backward(r(256, 1024))
    _close(ys, swiglu.swiglu_reference(a.detach(), b.detach()), tol)
    out["swiglu"] = [ys.detach(), a.grad, b.grad]

    qd, kd, vd = r(4, 8, 1, 64), r(4, 2, 300, 64), r(4, 2, 300, 64)
    mask = torch.rand(4, 300, generator=g) > 0.2
    yd = decode_attention.decode_attention(qd, kd, vd, mask)
    _close(yd, decode_attention.decode_attention_reference(qd, kd, vd, mask), tol)
    out["decode_attention"] = [yd]

    qc, kc, vc = r(2, 4, 128, 32), r(2, 2, 128, 32), r(2, 2, 128, 32)
    yc = causal_attention.causal_attention(qc, kc, vc)
    _close(yc, causal_attention.causal_attention_reference(qc, kc, vc), tol)
    out["causal_attention"] = [yc]

    z, t = r(64, 2000, scale=3.0), torch.randint(0, 2000, (64,), generator=g)
    st = token_stats.token_stats(z, t)
    for u, v in zip(st, token_stats.token_stats_reference(z, t)):
        _close(u, v, 1e-3)
    out["token_stats"] = list(st)

    h, W = r(96, 256).requires_grad_(), r(3000, 256, scale=0.1).requires_grad_()
    lab = torch.randint(0, 3000, (96,), generator=g)
    lab[::7] = -100
    lp = linear_logprobs.linear_logprobs(h, W, lab)
    lp.sum().backward()
    _close(lp, linear_logprobs.linear_logprobs_reference(h.detach(), W.detach(), lab), 1e-3)
    # the gradients also go through torch's GEMMs, whose bits depend on the thread count: the C++ row ops alone
    ext = load_cpp_ext("linear_logprobs")
    zl = torch.nn.functional.linear(h.detach(), W.detach()).float()
    lse, logp = ext.lse_gather(zl.clone(), lab, -100, False)
    zd = zl.clone()
    ext.dlogits_(zd, lab, lse, torch.rand(96, generator=g), -100)
    zg = zl.clone()
    ext.lse_gather(zg, lab, -100, True)
    out["linear_logprobs"] = [lp.detach(), lse, logp, zd, zg]

    if dt == torch.bfloat16:
        xb, wb = r(4, 512), r(1024, 512)
        yb = bf16_linear.bf16_linear(xb, wb)
        _close(yb, bf16_linear.bf16_linear_reference(xb, wb), tol)
        out["bf16_linear"] = [yb]

    wq = torch.randn(1024, 512, generator=g) * 0.05
    data, absmax = quant4.quantize_4bit(wq, "nf4", 64)
    xq = r(4, 512)
    yq = qmatmul.quant_linear(xq, data, absmax, None, "nf4", 64, 1024, 512)
    _close(yq, qmatmul.quant_linear_reference(xq, data, absmax, None, "nf4", 64, 1024, 512), 1e-2)
    out["qmatmul"] = [yq]

    if dt == torch.float32:  # the C++ LoRA kernels are fp32
        xl = r(512, 256).requires_grad_()
        Wl, A, B = r(384, 256, scale=0.05), r(8, 256, scale=0.1).requires_grad_(), r(384, 8, scale=0.1).requires_grad_()
        gl = r(512, 384)
        keep, ks = lora.make_dropout_mask(xl.shape, 0.1, "cpu", torch.Generator().manual_seed(5))
        yl = lora.lora_linear(xl, Wl, None, A, B, 2.0, dropout_p=0.1, generator=torch.Generator().manual_seed(5))
        yl.backward(gl)
        ext = load_cpp_ext("lora")  # bit-identity of the C++ products alone (the step adds torch GEMMs)
        drop = ~keep
        u = ext.rowdot(xl.detach(), A.detach(), ks, drop, 0, 0)
        out["lora"] = [u, ext.rowdot(xl.detach(), A.detach(), ks, None, 5, 1 << 12),
                       ext.expand(gl @ B.detach(), A.detach(), ks, None, drop, 0, 0),
                       ext.expand(gl @ B.detach(), A.detach(), ks, None, None, 5, 1 << 12),
                       ext.tallreduce(gl @ B.detach(), xl.detach(), ks, drop, 0, 0),
                       ext.tallreduce(gl @ B.detach(), xl.detach(), ks, None, 5, 1 << 12),
                       ext.drop_mask(512, 256, 5, 1 << 12)]
        xr, Ar, Br = (t.detach().clone().requires_grad_() for t in (xl, A, B))
        yr = lora.lora_linear_reference(xr, Wl, None, Ar, Br, 2.0, dropout_mask=keep, keep_scale=ks)
        yr.backward(gl)
        for u, v in ((yl, yr), (xl.grad, xr.grad), (A.grad, Ar.grad), (B.grad, Br.grad)):
            _close(u.detach(), v.detach(), 1e-3)
    return out


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_kernels_give_the_same_bits_at_any_thread_count_and_pool(monkeypatch, dt):
    """1 thread is the baseline; 2 and 3 threads on torch's OpenMP pool and on the Team (forced with
    QRU_CPU_POOL; 3 threads oversubscribe a 2-core machine)."""
    monkeypatch.setenv("QRU_BACKEND", "cpp")
    n = torch.get_num_threads()
    runs = {}
    try:
        for t, pool in ((1, "auto"), (2, "omp"), (2, "team"), (3, "omp"), (3, "team")):
            monkeypatch.setenv("QRU_CPU_POOL", pool)
            torch.set_num_threads(t)
            runs[(t, pool)] = _run_all(dt)
    finally:
        torch.set_num_threads(n)
    base = runs.pop((1, "auto"))
    for key, out in runs.items():
        for name, tensors in base.items():
            for i, (a, b) in enumerate(zip(tensors, out[name])):
                assert torch.equal(a, b), f"{name}[{i}] differs between 1 thread and {key}"


def _threads_now() -> int:
    return len(os.listdir("/proc/self/task"))


def _child(conn):
    """In a forked child: the kernel still runs, gives the parent's result, and on 2 threads it runs
    on the Team (never OpenMP), which starts a worker of its own (the parent's do not exist here)."""
    try:
        torch.set_num_threads(2)
        x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1))
        w = torch.ones(1024)
        before = _threads_now()
        y = load_cpp_ext("llama_ops").rmsnorm_fwd(x, w, 1e-6)[0]
        # raw bytes: pickling a tensor would copy it through torch's own OpenMP pool, which (libgomp)
        # hangs in a child forked after the parent used it; that is torch's, not the kernels'
        conn.send((y.numpy().tobytes(), _threads_now() - before, threads.cpu_pool(2)["pool"]))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(repr(e))
    finally:
        conn.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
def test_team_works_in_a_forked_child():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1))
        ref = load_cpp_ext("llama_ops").rmsnorm_fwd(x, torch.ones(1024), 1e-6)[0]  # the parent's pool is up
        ctx = mp.get_context("fork")
        for _ in range(2):  # twice: a second fork from the same parent
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(send,))
            p.start()
            send.close()
            assert recv.poll(60), "the forked child hung in the kernel"
            got = recv.recv()
            p.join(10)
            assert not isinstance(got, str), got
            y, new_threads, pool = got
            assert y == ref.numpy().tobytes()
            assert pool == "team", "a forked child must not join libgomp's pool"
            assert new_threads >= 1, "the child's kernel ran without a team worker"
    finally:
        torch.set_num_threads(n)


def _task_cpu_seconds() -> dict[str, float]:
    """CPU time (user + system) of each thread of this process, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
@pytest.mark.parametrize("pool", ["team", "omp"])
def test_idle_team_workers_sleep(monkeypatch, pool):
    """A worker waits for the next job only briefly (a bounded spin), then sleeps: between calls the
    team takes no CPU from another job on the machine. Measured per thread: the workers' CPU time
    over half a second of idling. On OpenMP, libgomp's workers likewise stop spinning within 50 ms."""
    monkeypatch.setenv("QRU_CPU_POOL", pool)
    n = torch.get_num_threads()
    w = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(2)) * 0.02).to(torch.bfloat16)
    packed, absmax = quant4.quantize_4bit_reference(w, "nf4", 64)
    code = quant4.codebook("nf4")
    ext = load_cpp_ext("quant")
    torch.set_num_threads(2)
    try:
        for _ in range(20):  # back-to-back calls: the workers are up (and spinning between calls)
            ext.q4_dequantize(packed, absmax, code, 64, w.numel(), torch.bfloat16, False)
        time.sleep(0.05)
        before = _task_cpu_seconds()
        time.sleep(0.5)
        after = _task_cpu_seconds()
    finally:
        torch.set_num_threads(n)
    busy = {t: after[t] - before[t] for t in before if t in after}
    assert max(busy.values()) < 0.05, f"threads burnt CPU while idle: {busy}"
