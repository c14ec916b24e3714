//! Adam as `torch.optim.Adam` (L2 weight decay added to the gradient, bias-corrected moments, eps
//! after the square root), written here so its state can be saved and a run resumed exactly; and a
//! dynamic loss scaler for fp16 mixed precision (as `torch.cuda.amp.GradScaler`).

use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW: weight decay applied to the weights (p <- p (1 - lr wd)), not added to the gradient.
    #[serde(default)]
    pub decoupled_weight_decay: bool,
}

impl Default for AdamConfig {
    /// The reference experiment's settings.
    fn default() -> Self {
        AdamConfig {
            lr: 1e-6,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.001,
            decoupled_weight_decay: false,
        }
    }
}

/// Adam over one flat buffer: the trainable parameters are re-pointed (`set_data`) at slices of a
/// single tensor, so an update is a dozen large kernels instead of a dozen per parameter (and the
/// overflow check of mixed precision is one device-to-host copy, not one per parameter).
pub struct Adam {
    pub config: AdamConfig,
    params: Vec<(String, Tensor)>,
    /// (offset, numel) of each parameter in the flat buffers.
    slots: Vec<(i64, i64)>,
    flat: Tensor,
    m: Tensor,
    v: Tensor,
    pub step: i64,
}

impl Adam {
    /// `params`: the trainable variables, by name (all of one dtype and device).
    pub fn new(mut params: Vec<(String, Tensor)>, config: AdamConfig) -> Adam {
        let total: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
        let (kind, device) = params
            .first()
            .map_or((Kind::Float, tch::Device::Cpu), |(_, p)| {
                (p.kind(), p.device())
            });
        let flat = Tensor::zeros([total.max(1)], (kind, device));
        let mut slots = Vec::with_capacity(params.len());
        let mut offset = 0;
        tch::no_grad(|| {
            for (_, p) in params.iter_mut() {
                let n = p.numel() as i64;
                let mut view = flat.narrow(0, offset, n);
                view.copy_(&p.reshape([-1]));
                p.set_data(&view.view(p.size().as_slice()));
                slots.push((offset, n));
                offset += n;
            }
        });
        let (m, v) = (flat.zeros_like(), flat.zeros_like());
        Adam {
            config,
            params,
            slots,
            flat,
            m,
            v,
            step: 0,
        }
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// The gradients as one flat tensor (zeros for parameters that got none).
    fn flat_grad(&self) -> Tensor {
        let parts: Vec<Tensor> = self
            .params
            .iter()
            .map(|(_, p)| {
                let g = p.grad();
                if g.defined() {
                    g.reshape([-1])
                } else {
                    p.zeros_like().reshape([-1])
                }
            })
            .collect();
        if parts.is_empty() {
            return self.flat.zeros_like();
        }
        Tensor::cat(&parts, 0)
    }

    /// Applies one update with the gradients multiplied by `inv_scale` (1 without loss scaling).
    /// With `check_finite`, first checks them; returns false (and changes nothing) when a gradient is
    /// inf or nan.
    ///
    /// On CUDA the flat buffer is updated in 16 M-value pieces (few kernel launches, bounded
    /// temporaries); on CPU parameter by parameter in cache-sized pieces.
    pub fn step(&mut self, inv_scale: f64, check_finite: bool) -> bool {
        let c = self.config;
        tch::no_grad(|| {
            let on_gpu = self.flat.device().is_cuda();
            let grads: Vec<(i64, Tensor)> = if on_gpu {
                vec![(0, self.flat_grad())]
            } else {
                self.params
                    .iter()
                    .zip(&self.slots)
                    .map(|((_, p), &(off, _))| {
                        let g = p.grad();
                        (
                            off,
                            if g.defined() {
                                g.reshape([-1])
                            } else {
                                p.zeros_like().reshape([-1])
                            },
                        )
                    })
                    .collect()
            };
            if check_finite
                && !grads
                    .iter()
                    .all(|(_, g)| bool::try_from(g.isfinite().all()).unwrap_or(false))
            {
                return false;
            }
            self.step += 1;
            let bc1 = 1.0 - c.beta1.powi(self.step as i32);
            let bc2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
            // Pieces bound the temporaries: 16 M values (64 MB) on the GPU, 32 K values (in cache) on the CPU.
            let piece = if on_gpu { 1 << 24 } else { 1 << 15 };
            for (off, g) in grads {
                let n = g.numel() as i64;
                let mut start = 0;
                while start < n {
                    let len = piece.min(n - start);
                    let mut g = g.narrow(0, start, len);
                    let mut p = self.flat.narrow(0, off + start, len);
                    let mut m = self.m.narrow(0, off + start, len);
                    let mut v = self.v.narrow(0, off + start, len);
                    if inv_scale != 1.0 {
                        g = &g * inv_scale;
                    }
                    if c.weight_decay != 0.0 && c.decoupled_weight_decay {
                        let _ = p.g_mul_scalar_(1.0 - c.lr * c.weight_decay);
                    } else if c.weight_decay != 0.0 {
                        g = &g + &p * c.weight_decay;
                    }
                    // As torch.optim.Adam: m <- lerp(m, g, 1 - b1); v <- b2 v + (1 - b2) g^2;
                    // p <- p - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps).
                    let _ = m.lerp_(&g, 1.0 - c.beta1);
                    let _ = v.lerp_(&(&g * &g), 1.0 - c.beta2);
                    let mut denom = v.sqrt();
                    let _ = denom.g_div_scalar_(bc2_sqrt).g_add_scalar_(c.eps);
                    let _ = p.addcdiv_(&(&m * (-c.lr / bc1)), &denom);
                    start += len;
                }
            }
            true
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for ((name, p), &(off, n)) in self.params.iter().zip(&self.slots) {
            let shape = p.size();
            named.push((
                format!("m.{name}"),
                self.m.narrow(0, off, n).view(shape.as_slice()),
            ));
            named.push((
                format!("v.{name}"),
                self.v.narrow(0, off, n).view(shape.as_slice()),
            ));
        }
        named.push(("step".into(), Tensor::from_slice(&[self.step])));
        Tensor::write_safetensors(&named, path).map_err(Error::Torch)
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        let tensors = Tensor::read_safetensors(path).map_err(Error::Torch)?;
        let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        let missing = |k: &str| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("optimizer state has no {k}"),
        };
        tch::no_grad(|| -> Result<()> {
            for ((name, _), &(off, n)) in self.params.iter().zip(&self.slots) {
                for (buf, prefix) in [(&self.m, "m"), (&self.v, "v")] {
                    let key = format!("{prefix}.{name}");
                    let t = map.get(&key).ok_or_else(|| missing(&key))?;
                    if t.numel() as i64 != n {
                        return Err(Error::Checkpoint {
                            path: path.to_path_buf(),
                            reason: format!("{key} has the wrong size"),
                        });
                    }
                    buf.narrow(0, off, n)
                        .copy_(&t.reshape([-1]).to_kind(buf.kind()).to_device(buf.device()));
                }
            }
            Ok(())
        })?;
        self.step = map
            .get("step")
            .ok_or_else(|| missing("step"))?
            .int64_value(&[0]);
        Ok(())
    }
}

/// Dynamic loss scaling for fp16: start at 2^16, halve on overflow (and skip that step), double
/// after 2000 steps without one.
pub struct LossScaler {
    pub scale: f64,
    good_steps: usize,
    pub enabled: bool,
}

impl LossScaler {
    pub fn new(enabled: bool) -> LossScaler {
        LossScaler {
            scale: if enabled { 65536.0 } else { 1.0 },
            good_steps: 0,
            enabled,
        }
    }

    /// Records whether the step's gradients were finite.
    pub fn update(&mut self, finite: bool) {
        if !self.enabled {
            return;
        }
        if !finite {
            self.scale /= 2.0;
            self.good_steps = 0;
            return;
        }
        self.good_steps += 1;
        if self.good_steps == 2000 {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
    }
}

/// Learning rate over a run: a base schedule and an optional linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum LrSchedule {
    /// The base rate throughout.
    Constant,
    /// `torch.optim.lr_scheduler.StepLR(step_size, gamma)` stepped at the start of every epoch, as
    /// the reference experiment did: during epoch e (from 1) the rate is base x gamma^(e / step_size)
    /// (integer division), so the first step_size - 1 epochs run at the full rate.
    Step { step_size: usize, gamma: f64 },
    /// Cosine decay from the base rate to 0 over the steps after the warm-up, per step.
    Cosine,
}

impl std::str::FromStr for LrSchedule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!("unknown schedule {s:?} (constant, cosine, step or step:STEP_SIZE:GAMMA, e.g. step:10:0.1)")
        };
        match s.split(':').collect::<Vec<_>>().as_slice() {
            ["constant"] => Ok(LrSchedule::Constant),
            ["cosine"] => Ok(LrSchedule::Cosine),
            ["step"] => Ok(LrSchedule::Step {
                step_size: 10,
                gamma: 0.1,
            }),
            ["step", size, gamma] => {
                let step_size: usize = size.parse().map_err(|_| bad())?;
                let gamma: f64 = gamma.parse().map_err(|_| bad())?;
                if step_size == 0 || !(gamma.is_finite() && gamma > 0.0) {
                    return Err(format!(
                        "{s:?}: the step size must be positive and gamma a positive number"
                    ));
                }
                Ok(LrSchedule::Step { step_size, gamma })
            }
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for LrSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LrSchedule::Constant => write!(f, "constant"),
            LrSchedule::Cosine => write!(f, "cosine"),
            LrSchedule::Step { step_size, gamma } => write!(f, "step:{step_size}:{gamma}"),
        }
    }
}

impl LrSchedule {
    /// The rate of optimizer step `step` (from 0) of a run of `epochs` x `steps_per_epoch` steps,
    /// the first `warmup_epochs` of them ramping linearly up to the schedule's rate.
    pub fn lr(
        &self,
        base: f64,
        step: usize,
        steps_per_epoch: usize,
        epochs: usize,
        warmup_epochs: usize,
    ) -> f64 {
        let spe = steps_per_epoch.max(1);
        let total = (spe * epochs).max(1);
        let warm = (spe * warmup_epochs).min(total);
        let scheduled = match *self {
            LrSchedule::Constant => base,
            LrSchedule::Step { step_size, gamma } => {
                let epoch = step / spe + 1;
                base * gamma.powi((epoch / step_size.max(1)) as i32)
            }
            LrSchedule::Cosine => {
                let t = step.saturating_sub(warm) as f64 / (total - warm).max(1) as f64;
                base * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
            }
        };
        if step < warm {
            scheduled * (step + 1) as f64 / warm as f64
        } else {
            scheduled
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_scaler_halves_on_overflow_and_doubles_after_2000_good_steps() {
        let mut s = LossScaler::new(true);
        assert_eq!(s.scale, 65536.0);
        s.update(false);
        assert_eq!(s.scale, 32768.0);
        for _ in 0..1999 {
            s.update(true);
        }
        assert_eq!(s.scale, 32768.0, "grew before 2000 good steps");
        s.update(true);
        assert_eq!(s.scale, 65536.0);
        // An overflow restarts the count of good steps.
        for _ in 0..1500 {
            s.update(true);
        }
        s.update(false);
        for _ in 0..1999 {
            s.update(true);
        }
        assert_eq!(s.scale, 32768.0);

        let mut off = LossScaler::new(false);
        off.update(false);
        assert_eq!(off.scale, 1.0, "a disabled scaler never changes");
    }

    #[test]
    fn a_step_with_non_finite_gradients_is_skipped() {
        let p = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let mut adam = Adam::new(vec![("p".into(), p.shallow_clone())], AdamConfig::default());
        let before = Vec::<f32>::try_from(&p.detach()).unwrap();
        (&p * f64::INFINITY).sum(Kind::Float).backward();
        assert!(!adam.step(1.0, true), "an infinite gradient was applied");
        assert_eq!(adam.step, 0);
        assert_eq!(Vec::<f32>::try_from(&p.detach()).unwrap(), before);
        adam.zero_grad();
        (&p * 3.0).sum(Kind::Float).backward();
        assert!(adam.step(1.0, true));
        assert_eq!(adam.step, 1);
        assert_ne!(Vec::<f32>::try_from(&p.detach()).unwrap(), before);
    }
}
