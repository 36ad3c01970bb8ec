//! Policy weights as bytes: the safetensors format, on the wire and on disk.
//!
//! safetensors is an 8-byte header length, a JSON header (name -> dtype,
//! shape, byte range, plus a free `__metadata__` string map) and the raw
//! little-endian tensor data. PyTorch, NumPy and JAX read it without
//! libtorch or this crate, so an actor in another language only needs this
//! format and `proto/` (NumPy has no bf16: `proto/flgfn.proto` says how to
//! widen one).
//!
//! Weights are encoded as f32, or as bf16 ([`WeightEncoding::Bf16`]: half
//! the bytes, 8 significant bits of which 7 stored, rounded to nearest
//! even). Decoding accepts
//! either and always yields f32 values, since actors sample in f32.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};
use serde::{Deserialize, Serialize};

/// How weight values are stored in the safetensors buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightEncoding {
    /// Exact: 4 bytes per value.
    #[default]
    F32,
    /// bfloat16: 2 bytes per value, relative error at most 2^-8 (normal
    /// values; subnormals keep fewer bits).
    Bf16,
}

impl WeightEncoding {
    /// The name written into the buffer's metadata.
    pub fn name(self) -> &'static str {
        match self {
            WeightEncoding::F32 => "f32",
            WeightEncoding::Bf16 => "bf16",
        }
    }
}

/// One named tensor as host f32 values in row-major order.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedArray {
    /// The parameter's name in the network (e.g. `hidden0.weight`).
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub values: Vec<f32>,
}

/// Why a weight buffer cannot be produced or used.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// Not a valid safetensors buffer.
    #[error("not a safetensors buffer: {0}")]
    Format(String),
    /// A tensor has a dtype this crate does not read.
    #[error("tensor `{name}` has dtype {dtype}; only F32 and BF16 are read")]
    Dtype {
        /// The tensor.
        name: String,
        /// Its dtype as safetensors names it.
        dtype: String,
    },
    /// The buffer does not hold exactly the network's parameters.
    #[error("weights do not fit the network: {0}")]
    Mismatch(String),
    /// The buffer's metadata names another task, model or version than
    /// the one expected.
    #[error("the weights' metadata does not match: {0}")]
    Metadata(String),
    /// A value is NaN or infinite. flgfn's learner never publishes or
    /// saves such weights (it skips non-finite steps and undoes updates
    /// that would overflow), and a policy with
    /// one would sample silently degenerate trajectories: a NaN logit
    /// makes every probability NaN, and the draw then always picks the
    /// last valid action.
    #[error("tensor `{name}` holds a non-finite value ({value}) at element {index}")]
    NonFinite {
        /// The tensor.
        name: String,
        /// The first such element, in row-major order.
        index: usize,
        /// Its value.
        value: f32,
    },
}

/// Encodes `arrays` (sorted by name in the buffer) with `metadata` in the
/// header's `__metadata__` map. A header longer than safetensors reads
/// (100 MB: a checkpoint's metadata holds the evaluator's best objects,
/// which grow with the state) is refused here, where it is made, not
/// written to be set aside as damaged at the next resume.
pub fn encode(
    arrays: &[NamedArray],
    encoding: WeightEncoding,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, WeightsError> {
    encode_within(arrays, encoding, metadata, MAX_HEADER_BYTES)
}

/// [`encode`] with a given header limit.
fn encode_within(
    arrays: &[NamedArray],
    encoding: WeightEncoding,
    metadata: &BTreeMap<String, String>,
    max_header_bytes: usize,
) -> Result<Vec<u8>, WeightsError> {
    // (The safetensors crate indexes past its name list on a repeated
    // name, a panic; `__metadata__` would write a header no reader opens.)
    let mut names = std::collections::HashSet::new();
    if let Some(array) = arrays
        .iter()
        .find(|a| a.name == "__metadata__" || !names.insert(a.name.as_str()))
    {
        return Err(WeightsError::Format(format!(
            "tensor name `{}` given twice, or reserved",
            array.name
        )));
    }
    let (dtype, data): (Dtype, Vec<Vec<u8>>) = match encoding {
        WeightEncoding::F32 => (
            Dtype::F32,
            arrays
                .iter()
                .map(|a| a.values.iter().flat_map(|v| v.to_le_bytes()).collect())
                .collect(),
        ),
        WeightEncoding::Bf16 => (
            Dtype::BF16,
            arrays
                .iter()
                .map(|a| {
                    a.values
                        .iter()
                        .flat_map(|&v| f32_to_bf16(v).to_le_bytes())
                        .collect()
                })
                .collect(),
        ),
    };
    let mut views = Vec::with_capacity(arrays.len());
    for (array, bytes) in arrays.iter().zip(&data) {
        let view = TensorView::new(dtype, array.shape.clone(), bytes)
            .map_err(|e| WeightsError::Format(format!("tensor `{}`: {e:?}", array.name)))?;
        views.push((array.name.as_str(), view));
    }
    let mut info: HashMap<String, String> = metadata.clone().into_iter().collect();
    info.insert("encoding".to_owned(), encoding.name().to_owned());
    let bytes = safetensors::tensor::serialize(views, &Some(info))
        .map_err(|e| WeightsError::Format(format!("{e:?}")))?;
    let header_len = bytes
        .first_chunk::<8>()
        .map_or(0, |length| u64::from_le_bytes(*length));
    if header_len > max_header_bytes as u64 {
        return Err(WeightsError::Format(format!(
            "the header would be {header_len} bytes (its metadata {} bytes), over the {max_header_bytes} that safetensors reads",
            metadata.values().map(String::len).sum::<usize>()
        )));
    }
    Ok(bytes)
}

/// The longest header read, the safetensors crate's own limit: weights
/// with a longer one would be refused by it anyway, and checked here first
/// the header would be parsed with no limit (a learner's grant may be up
/// to 4 GiB, and parsed JSON takes several times its text).
const MAX_HEADER_BYTES: usize = 100_000_000;

/// What [`check_offsets`] reads of one header entry; other fields (and
/// the `__metadata__` map) are skipped unparsed.
#[derive(Deserialize)]
#[serde(expecting = "a tensor entry (dtype, shape, data_offsets)")]
struct HeaderEntry {
    dtype: Option<Dtype>,
    shape: Option<Vec<u64>>,
    data_offsets: Option<Vec<u64>>,
}

impl HeaderEntry {
    /// Why this entry, of a buffer with `data_len` data bytes, is refused.
    fn refusal(&self, name: &str, data_len: u64) -> Option<String> {
        let begin = self.data_offsets.as_ref().and_then(|o| o.first()).copied();
        let end = self.data_offsets.as_ref().and_then(|o| o.get(1)).copied();
        if end.is_some_and(|end| end > data_len) {
            return Some(format!(
                "tensor `{name}` ends past the buffer ({data_len} data bytes)"
            ));
        }
        let value_bytes = match self.dtype? {
            Dtype::F32 => 4u64,
            Dtype::BF16 => 2,
            _ => return None,
        };
        let (begin, end, shape) = (begin?, end?, self.shape.as_ref()?);
        // Elements first, as the crate counts them: a 0 anywhere makes an
        // empty tensor, however large the other dimensions.
        let needed = shape
            .iter()
            .try_fold(1u64, |elements, &dim| elements.checked_mul(dim))
            .and_then(|elements| elements.checked_mul(value_bytes));
        (needed != end.checked_sub(begin)).then(|| {
            format!(
                "tensor `{name}` has shape {shape:?}, which does not fill its {} bytes",
                end.saturating_sub(begin)
            )
        })
    }
}

/// Reads a header's entries one at a time, checking each as it comes and
/// keeping none: the memory is one entry's, whatever the header's length.
/// (A name given twice has each of its entries checked; the crate keeps
/// the last.) The first refusal is left in `refused`.
struct CheckEntries<'a> {
    data_len: u64,
    refused: &'a mut Option<String>,
}

impl<'de> serde::de::DeserializeSeed<'de> for CheckEntries<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for CheckEntries<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a map of tensor names to entries")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(name) = map.next_key::<String>()? {
            if name == "__metadata__" {
                map.next_value::<serde::de::IgnoredAny>()?;
                continue;
            }
            let entry: HeaderEntry = map.next_value()?;
            if let Some(why) = entry.refusal(&name, self.data_len) {
                *self.refused = Some(why);
                return Err(serde::de::Error::custom("refused"));
            }
        }
        Ok(())
    }
}

/// Refuses a header whose tensors claim bytes past the buffer's end before
/// the safetensors crate reads it: its size check adds the claimed end to
/// the header's length unchecked, which a crafted header overflows (a
/// panic where overflow checks are on). Also refuses, naming the tensor,
/// an F32 or BF16 tensor whose shape does not fill its bytes (the crate
/// says only `TensorInvalidInfo`), and a header over the crate's limit
/// before parsing it.
fn check_offsets(bytes: &[u8]) -> Result<(), WeightsError> {
    check_offsets_within(bytes, MAX_HEADER_BYTES)
}

/// [`check_offsets`] with a given header limit.
fn check_offsets_within(bytes: &[u8], max_header_bytes: usize) -> Result<(), WeightsError> {
    use serde::de::DeserializeSeed;
    let malformed = |what: &str| WeightsError::Format(format!("safetensors header: {what}"));
    let Some((length, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(malformed("shorter than its 8-byte length"));
    };
    let header_len = usize::try_from(u64::from_le_bytes(*length))
        .ok()
        .filter(|&n| n <= rest.len())
        .ok_or_else(|| malformed("longer than the buffer"))?;
    if header_len > max_header_bytes {
        return Err(malformed(&format!(
            "{header_len} bytes long, over the {max_header_bytes} bytes safetensors reads"
        )));
    }
    let data_len = (rest.len() - header_len) as u64;
    let mut refused = None;
    let mut header = serde_json::Deserializer::from_slice(&rest[..header_len]);
    let parsed = CheckEntries {
        data_len,
        refused: &mut refused,
    }
    .deserialize(&mut header)
    .and_then(|()| header.end());
    match (refused, parsed) {
        (Some(why), _) => Err(malformed(&why)),
        (None, Err(error)) => Err(malformed(&error.to_string())),
        (None, Ok(())) => Ok(()),
    }
}

/// A decoded buffer: every tensor as f32, and the metadata map.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DecodedWeights {
    /// The tensors, sorted by name.
    pub arrays: Vec<NamedArray>,
    /// The header's `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
}

impl DecodedWeights {
    /// The first `(key, ours)` of `expected` whose metadata value differs,
    /// as `(key, theirs, ours)`. A key the metadata lacks passes: weights
    /// written elsewhere carry none.
    pub fn metadata_mismatch<'a>(
        &'a self,
        expected: &[(&'a str, &'a str)],
    ) -> Option<(&'a str, &'a str, &'a str)> {
        expected.iter().find_map(|&(key, ours)| {
            self.metadata
                .get(key)
                .filter(|theirs| *theirs != ours)
                .map(|theirs| (key, theirs.as_str(), ours))
        })
    }
}

/// The header's `__metadata__` map alone, with the header checked as
/// [`decode`] checks it, whatever the tensors' dtypes (those the
/// safetensors crate names: not the 8-bit float types of later versions):
/// a reader can tell what wrote a buffer before reading its tensors.
pub fn decode_metadata(bytes: &[u8]) -> Result<BTreeMap<String, String>, WeightsError> {
    check_offsets(bytes)?;
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| WeightsError::Format(format!("{e:?}")))?;
    Ok(header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect())
}

/// Decodes a buffer written by [`encode`] (or by any safetensors writer,
/// with F32 or BF16 tensors).
pub fn decode(bytes: &[u8]) -> Result<DecodedWeights, WeightsError> {
    let metadata = decode_metadata(bytes)?;
    let tensors =
        SafeTensors::deserialize(bytes).map_err(|e| WeightsError::Format(format!("{e:?}")))?;
    let mut arrays: Vec<NamedArray> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                    .collect(),
                other => {
                    return Err(WeightsError::Dtype {
                        name,
                        dtype: format!("{other:?}"),
                    });
                }
            };
            Ok(NamedArray {
                name,
                shape: View::shape(&view).to_vec(),
                values,
            })
        })
        .collect::<Result<_, _>>()?;
    arrays.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(DecodedWeights { arrays, metadata })
}

/// Rounds to the nearest bfloat16 (ties to even), as PyTorch does, except
/// that a finite value stays finite: one beyond bfloat16's largest (f32
/// values within 2^-8 of f32::MAX, which PyTorch rounds to infinity) gives
/// that largest, with its sign. Weights the learner publishes are finite,
/// and an actor refuses any that are not.
pub fn f32_to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        // Keep it a NaN whatever the low bits were.
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7FFF + ((bits >> 16) & 1);
    let rounded = (bits.wrapping_add(round) >> 16) as u16;
    if value.is_finite() && rounded & 0x7FFF == 0x7F80 {
        return rounded - 1;
    }
    rounded
}

/// Widens a bfloat16 exactly.
pub fn bf16_to_f32(value: u16) -> f32 {
    f32::from_bits(u32::from(value) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrays() -> Vec<NamedArray> {
        vec![
            NamedArray {
                name: "heads.weight".to_owned(),
                shape: vec![2, 3],
                values: vec![0.1, -2.5, 3.0e-3, 7.0, -0.0, 1.0 / 3.0],
            },
            NamedArray {
                name: "heads.bias".to_owned(),
                shape: vec![2],
                values: vec![1.0, -1.0],
            },
        ]
    }

    #[test]
    fn f32_round_trips_exactly_with_metadata() {
        let metadata = BTreeMap::from([("version".to_owned(), "12".to_owned())]);
        let bytes = encode(&arrays(), WeightEncoding::F32, &metadata).unwrap();
        let decoded = decode(&bytes).unwrap();
        let mut expected = arrays();
        expected.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(decoded.arrays, expected);
        assert_eq!(decoded.metadata["version"], "12");
        assert_eq!(decoded.metadata["encoding"], "f32");
    }

    /// Bytes as any safetensors reader expects them, not only as this
    /// module reads them back: a header padded to 8 bytes, little-endian
    /// values, bf16 as an f32's high half.
    #[test]
    fn the_bytes_are_those_of_the_format() {
        let one = [NamedArray {
            name: "w".to_owned(),
            shape: vec![2],
            values: vec![1.0, -2.0],
        }];
        for (encoding, data) in [
            (WeightEncoding::F32, vec![0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0]),
            (WeightEncoding::Bf16, vec![0x80, 0x3f, 0, 0xc0]),
        ] {
            let bytes = encode(&one, encoding, &BTreeMap::new()).unwrap();
            let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            assert_eq!(header_len % 8, 0);
            let header: serde_json::Value =
                serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
            assert_eq!(
                header["w"]["data_offsets"],
                serde_json::json!([0, data.len()])
            );
            assert_eq!(&bytes[8 + header_len..], &data[..], "{encoding:?}");
        }
        // A header written by hand: metadata last, offsets in another
        // order than the names, a scalar and an empty tensor.
        let header = r#"{"b":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"a":{"dtype":"BF16","shape":[1],"data_offsets":[4,6]},"e":{"dtype":"F32","shape":[4611686018427387904,0],"data_offsets":[6,6]},"__metadata__":{"task":"t"}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0, 0, 0x40, 0x40, 0x80, 0xbf]);
        let decoded = decode(&bytes).unwrap();
        let found: Vec<_> = decoded
            .arrays
            .iter()
            .map(|a| (a.name.as_str(), a.values.clone()))
            .collect();
        assert_eq!(found, [("a", vec![-1.0]), ("b", vec![3.0]), ("e", vec![])]);
        assert_eq!(decoded.metadata["task"], "t");
    }

    #[test]
    fn a_name_given_twice_or_reserved_is_refused_not_panicked_on() {
        for names in [["w", "w"], ["w", "__metadata__"]] {
            let arrays: Vec<NamedArray> = names
                .iter()
                .map(|name| NamedArray {
                    name: (*name).to_owned(),
                    shape: vec![1],
                    values: vec![0.0],
                })
                .collect();
            let refused = encode(&arrays, WeightEncoding::F32, &BTreeMap::new()).unwrap_err();
            let named = format!("`{}` given twice, or reserved", names[1]);
            assert!(refused.to_string().contains(&named), "{refused}");
        }
    }

    #[test]
    fn the_buffer_is_plain_safetensors() {
        let bytes = encode(&arrays(), WeightEncoding::F32, &BTreeMap::new()).unwrap();
        // 8-byte little-endian header length, then a JSON header naming
        // dtype, shape and byte range of each tensor.
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        assert_eq!(header["heads.weight"]["dtype"], "F32");
        assert_eq!(header["heads.weight"]["shape"], serde_json::json!([2, 3]));
        assert_eq!(bytes.len(), 8 + header_len + 4 * 8);
    }

    #[test]
    fn bf16_halves_the_data_and_keeps_three_significant_digits() {
        let f32_bytes = encode(&arrays(), WeightEncoding::F32, &BTreeMap::new()).unwrap();
        let bf16_bytes = encode(&arrays(), WeightEncoding::Bf16, &BTreeMap::new()).unwrap();
        // The data after each header: 8 values x 4 bytes, and x 2.
        let data = |bytes: &[u8]| {
            let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            bytes.len() - 8 - header
        };
        assert_eq!((data(&f32_bytes), data(&bf16_bytes)), (32, 16));
        let decoded = decode(&bf16_bytes).unwrap();
        assert_eq!(decoded.metadata["encoding"], "bf16");
        let weight = &decoded.arrays[1];
        assert_eq!(weight.name, "heads.weight");
        for (got, want) in weight.values.iter().zip(&arrays()[0].values) {
            assert!((got - want).abs() <= want.abs() / 256.0, "{got} vs {want}");
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies halfway between two bf16 values: ties go to even (1).
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        // Just above halfway rounds up.
        let above = 1.0 + 1.0 / 256.0 + 1.0 / 65536.0;
        assert_eq!(bf16_to_f32(f32_to_bf16(above)), 1.0 + 1.0 / 128.0);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        // Finite stays finite, infinite stays infinite.
        let largest = f32::from_bits(0x7F7F_0000);
        assert_eq!(bf16_to_f32(f32_to_bf16(f32::MAX)), largest);
        assert_eq!(bf16_to_f32(f32_to_bf16(-f32::MAX)), -largest);
        assert_eq!(bf16_to_f32(f32_to_bf16(f32::INFINITY)), f32::INFINITY);
        assert_eq!(
            bf16_to_f32(f32_to_bf16(f32::NEG_INFINITY)),
            f32::NEG_INFINITY
        );
        assert_eq!(bf16_to_f32(f32_to_bf16(-3.0)), -3.0);
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        for bytes in [&b""[..], b"12345678", &[255; 64][..]] {
            assert!(matches!(decode(bytes), Err(WeightsError::Format(_))));
        }
    }

    #[test]
    fn a_shape_that_does_not_fill_its_bytes_names_the_tensor() {
        for shape in ["[2,3]", "[1]", &format!("[{max},{max}]", max = u64::MAX)] {
            let header =
                format!(r#"{{"w":{{"dtype":"F32","shape":{shape},"data_offsets":[0,20]}}}}"#);
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(&[0; 20]);
            let error = decode(&bytes).unwrap_err().to_string();
            assert!(error.contains("tensor `w` has shape"), "{shape}: {error}");
        }
    }

    #[test]
    fn a_header_claiming_bytes_past_the_buffer_is_refused_without_overflow() {
        let header = format!(
            r#"{{"huge":{{"dtype":"U8","shape":[{max}],"data_offsets":[0,{max}]}}}}"#,
            max = u64::MAX
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0; 4]);
        let error = decode(&bytes).unwrap_err().to_string();
        assert!(error.contains("`huge` ends past the buffer"), "{error}");
        for truncated in [&bytes[..5], &bytes[..12]] {
            assert!(decode(truncated).is_err());
        }
    }

    /// A header longer than safetensors reads is refused before it is
    /// parsed (a grant may be 4 GiB of it); `__metadata__` is skipped
    /// whatever its keys.
    #[test]
    fn a_header_over_the_limit_is_refused_before_parsing() {
        let metadata = BTreeMap::from([
            ("shape".to_owned(), "not a shape".to_owned()),
            ("data_offsets".to_owned(), "none".to_owned()),
        ]);
        let bytes = encode(&arrays(), WeightEncoding::F32, &metadata).unwrap();
        check_offsets(&bytes).unwrap();
        assert_eq!(decode(&bytes).unwrap().metadata["shape"], "not a shape");

        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        check_offsets_within(&bytes, header_len).unwrap();
        // Not JSON at all: refused for its length, unread.
        let mut long = 1001u64.to_le_bytes().to_vec();
        long.extend_from_slice(&[b'['; 1001]);
        let error = check_offsets_within(&long, 1000).unwrap_err().to_string();
        assert!(error.contains("1001 bytes long, over the"), "{error}");
        let error = check_offsets_within(&long, 1001).unwrap_err().to_string();
        assert!(!error.contains("bytes long"), "{error}");

        // Nor is such a header made: refused at encoding, saying why, where
        // one at the limit is made and read back.
        let error = encode_within(&arrays(), WeightEncoding::F32, &metadata, header_len - 1)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(&format!("the header would be {header_len} bytes"))
                && error.contains("safetensors reads"),
            "{error}"
        );
        let at_limit =
            encode_within(&arrays(), WeightEncoding::F32, &metadata, header_len).unwrap();
        assert_eq!(decode(&at_limit).unwrap().metadata["shape"], "not a shape");
    }

    /// Entries in the array form the crate also reads are checked too, and
    /// a name given twice has both of its entries checked.
    #[test]
    fn every_entry_is_checked_whatever_its_form() {
        for header in [
            r#"{"w":["F32",[2,3],[0,20]]}"#,
            r#"{"w":{"dtype":{"F32":null},"shape":[2,3],"data_offsets":[0,20]}}"#,
            r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]},"w":{"dtype":"F32","shape":[5],"data_offsets":[0,20]}}"#,
        ] {
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(&[0; 20]);
            let error = decode(&bytes).unwrap_err().to_string();
            assert!(
                error.contains("tensor `w` has shape [2, 3]"),
                "{header}: {error}"
            );
        }
    }
}
