"""A private calibration cache and a fake probe for one calibrate.CHOICES entry (tests only)."""
from qru.kernels import calibrate


def fake_choice(monkeypatch, tmp_path, choice: str, env: str, secs: dict):
    """Point QRU_CACHE at ``tmp_path``, unset the override ``env`` and give ``choice`` a probe that
    returns ``state["secs"]`` (which the test may change) and counts its calls in ``state["calls"]``.
    The machine has 2 cores and ``state["others"]`` other runnable tasks (default 0: idle), read
    afresh on every call; the probe runs ``state["during"]()`` when the test sets it."""
    monkeypatch.setenv("QRU_CACHE", str(tmp_path))
    monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(calibrate, "usable_cores", lambda: 2)
    monkeypatch.setattr(calibrate, "LOAD_SAMPLE_S", -1.0)
    calibrate.clear_memo()
    state = {"calls": 0, "secs": dict(secs), "others": 0, "during": None}
    monkeypatch.setattr(calibrate, "others_running", lambda: state["others"])

    def probe():
        state["calls"] += 1
        if state["during"]:
            state["during"]()
        return dict(state["secs"])

    cands, default, _, _ = calibrate.CHOICES[choice]
    monkeypatch.setitem(calibrate.CHOICES, choice, (cands, default, probe, lambda: True))
    return state
