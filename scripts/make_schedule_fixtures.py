"""Learning rates of torch.optim.lr_scheduler.StepLR stepped as the reference experiment stepped it
(`scheduler.step()` at the start of every epoch, before that epoch's optimizer steps).

Writes fixtures/schedules/steplr.json; run with the export-tools venv:
    ~/.cache/xray-clip/py-export/bin/python scripts/make_schedule_fixtures.py
"""
import json
import pathlib
import warnings

import torch

warnings.filterwarnings("ignore")  # "scheduler.step() before optimizer.step()": the reference's order
cases = []
for base, step_size, gamma, epochs in [(2e-6, 10, 0.1, 50), (1e-3, 3, 0.5, 12), (0.01, 1, 0.9, 5)]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=base)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    lrs = []
    for epoch in range(epochs):
        sched.step()  # as CLIPfinetune.py: at the top of the epoch loop
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
    cases.append({"base": base, "step_size": step_size, "gamma": gamma, "lr_per_epoch": lrs})
out = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "schedules" / "steplr.json"
out.write_text(json.dumps({"torch": torch.__version__, "cases": cases}, indent=1) + "\n")
print(out)
