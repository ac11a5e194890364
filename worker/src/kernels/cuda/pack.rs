//! The step's small integer arrays (token ids, positions, slots, sequence and tile descriptors,
//! block tables, logits rows) packed into one host buffer and copied to the device in one go.

use candle_core::{Device, Tensor};

use super::{device_ptr, gpu_error};
use crate::Result;

/// Where one array lies in the packed buffer (in u32 elements).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Section {
    pub start: usize,
    pub len: usize,
}

/// u32 arrays gathered on the host.
#[derive(Debug, Default)]
pub struct HostPack {
    data: Vec<u32>,
}

impl HostPack {
    /// Starts over, keeping the allocation.
    pub fn clear(&mut self) {
        self.data.clear();
    }

    /// Appends an array and returns where it lies.
    pub fn push(&mut self, values: impl IntoIterator<Item = u32>) -> Section {
        let start = self.data.len();
        self.data.extend(values);
        Section { start, len: self.data.len() - start }
    }

    /// Copies the buffer to `device` (one host-to-device copy).
    pub fn upload(&self, device: &Device) -> Result<DevicePack> {
        // An empty tensor has no address to hand out: keep at least one element.
        let data: &[u32] = if self.data.is_empty() { &[0] } else { &self.data };
        let tensor = Tensor::from_slice(data, data.len(), device).map_err(|e| gpu_error("uploading step inputs", e))?;
        let base = device_ptr(&tensor)?;
        Ok(DevicePack { _tensor: tensor, base })
    }
}

/// The packed arrays on the device.
pub struct DevicePack {
    _tensor: Tensor,
    base: u64,
}

impl DevicePack {
    /// The device address of a section's first element.
    pub fn ptr(&self, section: Section) -> u64 {
        self.base + 4 * section.start as u64
    }
}
