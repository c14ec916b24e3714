//! Where libtorch runs. The `--device` values are the runtime's (`cpu`, `cuda`, `auto`), parsed by
//! the same enum, so the three binaries accept the same words.

use runtime::engine::Device as DeviceOption;
use tch::Device;

use crate::error::{Error, Result};

/// The libtorch device for a `--device` value: `auto` is CUDA when libtorch sees a GPU, else CPU.
pub fn resolve(option: DeviceOption) -> Result<Device> {
    match option {
        DeviceOption::Cpu => Ok(Device::Cpu),
        DeviceOption::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        DeviceOption::Cuda => Err(Error::CudaUnavailable),
        DeviceOption::Auto if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        DeviceOption::Auto => Ok(Device::Cpu),
    }
}

/// `cpu`, `cuda:0`, ...: for messages and the run's config.json.
pub fn name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}
