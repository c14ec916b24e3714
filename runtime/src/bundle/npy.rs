//! Minimal `.npy` (NumPy format 1.0) for little-endian float32 C-order arrays: label embeddings in
//! bundles, and tensors handed to other tools for checking.

use std::path::Path;

use crate::error::{Error, Result};

pub fn to_bytes(shape: &[usize], data: &[f32]) -> Vec<u8> {
    debug_assert_eq!(shape.iter().product::<usize>(), data.len());
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Pad so that magic(6) + version(2) + len(2) + header ends on a 64-byte boundary with '\n'.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Parses a float32 array; returns (shape, data).
pub fn from_bytes(bytes: &[u8], name: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bad = |reason: &str| Error::Decode {
        path: name.to_path_buf(),
        format: "npy",
        reason: reason.to_string(),
    };
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file"));
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unsupported .npy version")),
    };
    let header = bytes
        .get(start..start.saturating_add(header_len))
        .ok_or_else(|| bad("truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not text"))?;
    if !header.contains("'descr': '<f4'") {
        return Err(bad(
            "only little-endian float32 ('<f4') arrays are supported",
        ));
    }
    if header.contains("'fortran_order': True") {
        return Err(bad("Fortran-order arrays are not supported"));
    }
    let shape_txt = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("header has no shape"))?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("bad shape")))
        .collect::<Result<_>>()?;
    let needed = shape
        .iter()
        .try_fold(4usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows"))?;
    let body = &bytes[start + header_len..];
    if body.len() != needed {
        return Err(bad(&format!(
            "shape {shape:?} needs {needed} bytes of data, file has {}",
            body.len()
        )));
    }
    let data = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((shape, data))
}

pub fn write(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    crate::fs::write_atomic(path, &to_bytes(shape, data))
}

pub fn read(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    from_bytes(&bytes, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_header_alignment() {
        let data: Vec<f32> = (0..6).map(|v| v as f32 * 0.5).collect();
        let bytes = to_bytes(&[2, 3], &data);
        assert_eq!((bytes.len() - 24) % 64, 0);
        let (shape, back) = from_bytes(&bytes, Path::new("x.npy")).unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(back, data);
        assert!(from_bytes(&bytes[..bytes.len() - 1], Path::new("x.npy")).is_err());
        // A count that fits usize but overflows once multiplied by 4 bytes.
        let header = format!(
            "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}\n",
            usize::MAX / 2
        );
        let mut huge = b"\x93NUMPY\x01\x00".to_vec();
        huge.extend_from_slice(&(header.len() as u16).to_le_bytes());
        huge.extend_from_slice(header.as_bytes());
        huge.extend_from_slice(&[0; 4]);
        let err = from_bytes(&huge, Path::new("x.npy")).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
        assert!(from_bytes(b"not numpy", Path::new("x.npy")).is_err());
    }
}
