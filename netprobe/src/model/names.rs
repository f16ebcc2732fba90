//! Enums that serialize as the exact strings netprobe always printed: one `name()` and one
//! `from_name()` per type, and serde, Display and a plain-string JSON schema derived from them
//! (so `netprobe.event/v1` and `netprobe.verdict/v1` and their schemas stay byte-identical).

use std::borrow::Cow;

/// A value with one printed name.
pub trait Named: Sized {
    fn name(&self) -> Cow<'static, str>;
    fn from_name(s: &str) -> Option<Self>;
}

/// Serialize, Deserialize, Display and JsonSchema (a string) through [`Named`].
macro_rules! by_name {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&$crate::model::Named::name(self))
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                <$t as $crate::model::Named>::from_name(&s).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        concat!("unknown ", stringify!($t), " {:?}"),
                        s
                    ))
                })
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&$crate::model::Named::name(self))
            }
        }
        impl schemars::JsonSchema for $t {
            fn inline_schema() -> bool {
                true
            }
            fn schema_name() -> Cow<'static, str> {
                String::schema_name()
            }
            fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
                String::json_schema(g)
            }
        }
    };
}
pub(crate) use by_name;

/// [`Named`] for enums without payload: each variant and its fixed name.
macro_rules! fixed_names {
    ($t:ident { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $crate::model::Named for $t {
            fn name(&self) -> Cow<'static, str> {
                Cow::Borrowed(self.as_str())
            }
            fn from_name(s: &str) -> Option<Self> {
                match s {
                    $($s => Some(Self::$v),)+
                    _ => None,
                }
            }
        }
        impl $t {
            pub const fn as_str(&self) -> &'static str {
                match self {
                    $(Self::$v => $s,)+
                }
            }
        }
        $crate::model::by_name!($t);
    };
}
pub(crate) use fixed_names;
