"""A private calibration cache and a fake probe for one calibrate.CHOICES entry (tests only)."""
from qru.kernels import calibrate


def fake_choice(monkeypatch, tmp_path, choice: str, env: str, secs: dict):
    """Point QRU_CACHE at ``tmp_path``, unset the override ``env`` and give ``choice`` a probe that
    returns ``state["secs"]`` (which the test may change) and counts its calls in ``state["calls"]``."""
    monkeypatch.setenv("QRU_CACHE", str(tmp_path))
    monkeypatch.delenv(env, raising=False)
    calibrate.clear_memo()
    state = {"calls": 0, "secs": dict(secs)}

    def probe():
        state["calls"] += 1
        return dict(state["secs"])

    cands, default, _, _ = calibrate.CHOICES[choice]
    monkeypatch.setitem(calibrate.CHOICES, choice, (cands, default, probe, lambda: True))
    return state
