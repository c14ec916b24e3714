"""Reference temperatures for runtime/src/calibration.rs: logits of an overconfident 22-class model
(seeded), and the temperature that minimises their mean negative log-likelihood, found by SciPy's
L-BFGS-B on T (the optimiser family of Guo et al.'s PyTorch LBFGS recipe) and checked by a bounded
scalar search. Needs numpy and scipy (the tools venv of `scripts/setup.sh --dev` has both).

    python scripts/make_calibration_fixtures.py fixtures/calibration
"""
import json
import pathlib
import sys

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import logsumexp

out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "fixtures/calibration")
out.mkdir(parents=True, exist_ok=True)
cases = []
for seed, (n, classes, scale, accuracy) in enumerate([(400, 22, 30.0, 0.8), (300, 6, 8.0, 0.95), (200, 15, 2.0, 0.5)]):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, n)
    correct = rng.random(n) < accuracy
    predicted = np.where(correct, truth, (truth + rng.integers(1, classes, n)) % classes)
    logits = rng.normal(0.0, 1.0, (n, classes))
    logits[np.arange(n), predicted] += 3.0
    logits = np.round(scale * logits / np.linalg.norm(logits, axis=1, keepdims=True), 4).astype(np.float32)
    z = logits.astype(np.float64)

    def nll(t):
        t = float(np.asarray(t).reshape(-1)[0])
        return float(np.mean(logsumexp(z / t, axis=1) - z[np.arange(n), truth] / t))

    lbfgs = minimize(nll, x0=[1.0], method="L-BFGS-B", bounds=[(0.01, 100.0)], options={"ftol": 1e-15, "gtol": 1e-12})
    scalar = minimize_scalar(nll, bounds=(0.01, 100.0), method="bounded", options={"xatol": 1e-10})
    t = float(lbfgs.x[0])
    assert abs(t - scalar.x) < 1e-4, (t, scalar.x)
    cases.append({"classes": classes, "truth": truth.tolist(), "logits": [round(float(v), 4) for v in logits.reshape(-1)],
                  "temperature": t, "nll_at_temperature": nll(t), "nll_at_1": nll(1.0)})
    print(f"case {seed}: {n} x {classes}, T = {t:.6f}, NLL {nll(1.0):.4f} -> {nll(t):.4f}")
(out / "temperature.json").write_text(json.dumps({"source": "scipy.optimize.minimize L-BFGS-B", "cases": cases}) + "\n")
