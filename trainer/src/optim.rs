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
        }
    }
}

pub struct Adam {
    pub config: AdamConfig,
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: i64,
}

impl Adam {
    /// `params`: the trainable variables, by name.
    pub fn new(params: Vec<(String, Tensor)>, config: AdamConfig) -> Adam {
        let m = params.iter().map(|(_, p)| p.zeros_like()).collect();
        let v = params.iter().map(|(_, p)| p.zeros_like()).collect();
        Adam {
            config,
            params,
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

    /// Gradients divided by `inv_scale` first (1 without loss scaling).
    pub fn step(&mut self, inv_scale: f64) {
        let c = self.config;
        self.step += 1;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for (i, (_, p)) in self.params.iter_mut().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut g = if inv_scale != 1.0 {
                    &g * inv_scale
                } else {
                    g.shallow_clone()
                };
                if c.weight_decay != 0.0 {
                    g += &*p * c.weight_decay;
                }
                let _ = self.m[i]
                    .g_mul_scalar_(c.beta1)
                    .g_add_(&(&g * (1.0 - c.beta1)));
                let _ = self.v[i]
                    .g_mul_scalar_(c.beta2)
                    .g_add_(&(&g * &g * (1.0 - c.beta2)));
                let denom = self.v[i].sqrt() / bc2.sqrt() + c.eps;
                let _ = p.g_sub_(&(&self.m[i] / denom * (c.lr / bc1)));
            }
        });
    }

    /// True when every gradient is finite (mixed precision overflows show up as inf/nan).
    pub fn grads_finite(&self) -> bool {
        self.params.iter().all(|(_, p)| {
            let g = p.grad();
            !g.defined() || bool::try_from(g.isfinite().all()).unwrap_or(false)
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            named.push((format!("m.{name}"), self.m[i].shallow_clone()));
            named.push((format!("v.{name}"), self.v[i].shallow_clone()));
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
            for (i, (name, p)) in self.params.iter().enumerate() {
                for (slot, prefix) in [(&mut self.m[i], "m"), (&mut self.v[i], "v")] {
                    let key = format!("{prefix}.{name}");
                    let t = map.get(&key).ok_or_else(|| missing(&key))?;
                    slot.copy_(&t.to_kind(Kind::Float).to_device(p.device()));
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

    /// Records whether the step's gradients were finite; returns whether to apply the step.
    pub fn update(&mut self, finite: bool) -> bool {
        if !self.enabled {
            return true;
        }
        if !finite {
            self.scale /= 2.0;
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps == 2000 {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}
