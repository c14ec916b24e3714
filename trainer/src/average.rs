//! An exponential moving average of a model's variables (Polyak averaging, as timm's `ModelEmaV2`):
//! the live weights keep training while the average, which is less noisy on a small data set, is
//! what a run validates, keeps as each checkpoint's model and exports.

use std::path::Path;

use tch::{nn, Tensor};

use crate::error::{Error, Result};

/// The file of a checkpoint that keeps the live (training) weights when the model file holds
/// their average; `--resume` continues training from it.
pub const LIVE_WEIGHTS: &str = "live_weights.safetensors";

pub struct WeightAverage {
    decay: f64,
    /// Updates so far: the effective decay ramps up with it, so early averages do not remember
    /// the random initialisation for long.
    pub updates: u64,
    /// (name, live variable, its average) for every floating-point variable (weights and
    /// BatchNorm statistics), sorted by name.
    vars: Vec<(String, Tensor, Tensor)>,
}

impl WeightAverage {
    /// Starts the average at the variables' current values, `updates` steps into the ramp.
    pub fn new(vs: &nn::VarStore, decay: f64, updates: u64) -> WeightAverage {
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.is_floating_point())
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let vars = tch::no_grad(|| {
            vars.into_iter()
                .map(|(name, live)| {
                    let avg = live.detach().copy();
                    (name, live, avg)
                })
                .collect()
        });
        WeightAverage {
            decay,
            updates,
            vars,
        }
    }

    /// The decay of the next update: `min(decay, (1 + n) / (10 + n))` after n updates.
    pub fn current_decay(&self) -> f64 {
        let n = self.updates as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    /// `average = d * average + (1 - d) * live`, after an optimiser step.
    pub fn update(&mut self) {
        let d = self.current_decay();
        tch::no_grad(|| {
            for (_, live, avg) in &mut self.vars {
                let _ = avg.lerp_(live, 1.0 - d);
            }
        });
        self.updates += 1;
    }

    /// Exchanges the live values and the averages, in place: the model then computes with the
    /// average (to validate or save it) until the next swap.
    pub fn swap(&mut self) {
        tch::no_grad(|| {
            for (_, live, avg) in &mut self.vars {
                let held = live.copy();
                live.copy_(avg);
                avg.copy_(&held);
            }
        });
    }

    /// Writes the tensors the model is not holding now (the live weights while swapped).
    pub fn save_held(&self, path: &Path) -> Result<()> {
        let named: Vec<(&str, &Tensor)> = self
            .vars
            .iter()
            .map(|(name, _, avg)| (name.as_str(), avg))
            .collect();
        Tensor::write_safetensors(&named, path).map_err(Error::Torch)
    }

    /// Reads what [`save_held`](Self::save_held) wrote into the model's variables.
    pub fn load_into_model(&self, path: &Path) -> Result<()> {
        let tensors = Tensor::read_safetensors(path).map_err(Error::Torch)?;
        let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        tch::no_grad(|| {
            for (name, live, _) in &self.vars {
                let t = map.get(name).filter(|t| t.size() == live.size());
                let Some(t) = t else {
                    return Err(Error::Checkpoint {
                        path: path.to_path_buf(),
                        reason: format!("no {name} of the model's shape"),
                    });
                };
                let mut live = live.shallow_clone();
                live.copy_(&t.to_kind(live.kind()).to_device(live.device()));
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::Module, Device, Kind};

    fn store() -> (nn::VarStore, nn::Linear) {
        let vs = nn::VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root() / "lin", 2, 1, Default::default());
        (vs, lin)
    }

    fn value(vs: &nn::VarStore, name: &str) -> Vec<f32> {
        let t = &vs.variables()[name];
        Vec::<f32>::try_from(t.reshape([-1])).unwrap()
    }

    fn set(vs: &nn::VarStore, name: &str, v: &[f32]) {
        tch::no_grad(|| {
            let mut t = vs.variables()[name].shallow_clone();
            t.copy_(&Tensor::from_slice(v).view(t.size().as_slice()));
        });
    }

    #[test]
    fn the_average_follows_the_ramped_decay_and_swaps_back() {
        let (vs, lin) = store();
        set(&vs, "lin.weight", &[0.0, 0.0]);
        let mut avg = WeightAverage::new(&vs, 0.5, 0);
        // first decay: min(0.5, 1/10) = 0.1
        assert!((avg.current_decay() - 0.1).abs() < 1e-12);
        set(&vs, "lin.weight", &[10.0, 20.0]);
        avg.update(); // 0.1 * 0 + 0.9 * live
        assert!((avg.current_decay() - 2.0 / 11.0).abs() < 1e-12);
        for _ in 0..20 {
            avg.update();
        }
        // the ramp ends at the decay asked for
        assert_eq!(avg.current_decay(), 0.5);
        set(&vs, "lin.weight", &[0.0, 0.0]);
        avg.update(); // 0.5 * (10, 20) + 0.5 * 0
        avg.swap();
        let w = value(&vs, "lin.weight");
        assert!(
            (w[0] - 5.0).abs() < 1e-3 && (w[1] - 10.0).abs() < 1e-3,
            "{w:?}"
        );
        let x = Tensor::ones([1, 2], (Kind::Float, Device::Cpu));
        let bias = value(&vs, "lin.bias")[0];
        let y = f32::try_from(lin.forward(&x).view([-1])).unwrap();
        assert!(
            (y - (w[0] + w[1] + bias)).abs() < 1e-5,
            "the model computes with the average"
        );
        avg.swap();
        assert_eq!(value(&vs, "lin.weight"), vec![0.0, 0.0]);
    }

    #[test]
    fn the_held_weights_round_trip_through_a_file() {
        let (vs, _) = store();
        set(&vs, "lin.weight", &[1.0, 2.0]);
        let mut avg = WeightAverage::new(&vs, 0.9, 100);
        set(&vs, "lin.weight", &[3.0, 4.0]);
        avg.update();
        avg.swap(); // the model holds the average, `avg` the live (3, 4)
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LIVE_WEIGHTS);
        avg.save_held(&path).unwrap();
        avg.load_into_model(&path).unwrap();
        assert_eq!(value(&vs, "lin.weight"), vec![3.0, 4.0]);
        std::fs::write(&path, b"not safetensors").unwrap();
        assert!(avg.load_into_model(&path).is_err());
    }
}
