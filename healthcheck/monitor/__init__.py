"""`HealthMonitor`: the init-time measurements, sampled during training, logged to TensorBoard.

    monitor = HealthMonitor(model, log_dir="runs/health", every=100)
    for x, y in loader:
        loss = criterion(model(x), y)
        loss.backward()
        monitor.step(loss)              # after backward, before or after optimizer.step()
        optimizer.step(); optimizer.zero_grad()
        monitor.after_optimizer_step()  # optional: update ratios of this step
    monitor.close()                     # or `with HealthMonitor(...) as monitor:`

On a sampled step (every `every` optimizer steps) the first training forward (grad enabled, model
in train mode) is recorded (the same recorder and statistics as `healthcheck.check`): E[y²],
residual ratio and effective rank at every join (or at every layer's input and the output of a
model without joins), ‖∂L/∂y‖ at those points from tensor hooks, dead units after ReLUs; step()
adds gradient and weight norms per parameter tensor (resolved again on every sample) and a weight
snapshot for the update ratio; the next `snr_window - 1` optimizer steps accumulate gradients on
device for the gradient SNR. Everything is reduced on device, across ranks under
torch.distributed, and copied to the host once per sampled step. Other steps do one device-side
NaN/Inf check of the loss and nothing else: no host sync, no hooks, no kept activations. A NaN/Inf
seen after the last sample is read and reported by `close()`.

Real training: with AMP pass `scaler=` (the GradScaler): norms are unscaled, an overflow step the
scaler skips is not a NaN, a scale that keeps falling is HC401. With gradient accumulation and
`step()` after every micro-batch pass `accumulation=k`. Parameters are resolved again on every
sample (unfreezing, `load_state_dict(assign=True)`, `.to()`). Under torch.compile the hooks do
nothing inside traced code (no graph break, no recompile): gradients, weights and the loss are
measured, the compiled forward's activations are not. `history` keeps the latest `history_size`
samples (100).

One module per job: `sampling` (hooks, parameters, device-side measurements), `reduction` (the
rank-independent layout, the all-reduce, the host copy), `findings` (rules, appear/clear,
warn/raise), TensorBoard in `healthcheck.report.tensorboard.TrainingLog`, and `core`, the
training-loop API that decides which steps are sampled.
"""

from healthcheck.monitor.core import HealthMonitor
from healthcheck.monitor.samples import DEFAULT_SELECT, HealthError, HealthWarning, TrainingSample

__all__ = ["DEFAULT_SELECT", "HealthError", "HealthMonitor", "HealthWarning", "TrainingSample"]
