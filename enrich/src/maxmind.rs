//! [`MaxMind`]: IP addresses → country, city and coordinates from a MaxMind DB file (GeoIP2 or
//! GeoLite2 City), memory-mapped and reopened when the file is replaced.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use maxminddb::{Mmap, Reader};
use quick_cache::sync::Cache;
use serde::Deserialize;

use crate::lookup::{Lookup, LookupError};

/// Where an address is, as far as the database knows. Cheap to clone (`Arc` inside).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Geo {
    /// ISO 3166-1 alpha-2 country code (`"DE"`), empty when unknown.
    pub country_code: Arc<str>,
    /// City name in English, empty when unknown.
    pub city: Arc<str>,
    /// Latitude, when the database has a location.
    pub latitude: Option<f64>,
    /// Longitude, when the database has a location.
    pub longitude: Option<f64>,
}

/// A MaxMind DB lookup by IP address (GeoIP2/GeoLite2 City or Country databases).
///
/// The file is memory-mapped, and checked for replacement at most every
/// [`MaxMind::reload_check`] (default 60 s): when its size or modification time changed, it is
/// opened again and the cache in front of it starts over. Replace the file by renaming a new
/// one over it (as `geoipupdate` does); rewriting it in place under a running worker is not
/// supported by memory mapping.
///
/// Addresses that are not public (private, loopback, link-local, documentation, shared,
/// multicast, unspecified) are never located.
///
/// ```no_run
/// use sluice_enrich::{Enrich, MaxMind};
///
/// struct Visit { addr: String, country: String }
///
/// let geoip = MaxMind::open("/var/lib/GeoIP/GeoLite2-City.mmdb")?;
/// let enrich = Enrich::new(
///     geoip,
///     |v: &Visit| v.addr.parse().ok(),
///     |v, geo| v.country = geo.country_code.to_string(),
/// );
/// # Ok::<(), sluice_enrich::LookupError>(())
/// ```
pub struct MaxMind {
    path: PathBuf,
    loaded: RwLock<Arc<Loaded>>,
    check_every: Duration,
    checked: Mutex<Instant>,
}

/// Decoded records kept per open database (a City database's records for the addresses seen:
/// a country code, a city name and two coordinates each).
const RECORDS: usize = 65_536;

struct Loaded {
    reader: Reader<Mmap>,
    /// Decoded records by their offset in the data section. Many addresses (every network of
    /// a city) point at one record, and decoding it costs more than finding it in the tree, so
    /// each record is decoded once while the file is open.
    records: Cache<usize, Option<Geo>>,
    stamp: (u64, Option<SystemTime>),
    generation: u64,
}

impl MaxMind {
    /// Opens the database at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LookupError> {
        let path = path.as_ref().to_path_buf();
        let loaded = load(&path, 0)?;
        tracing::info!(path = %path.display(), database = %loaded.reader.metadata.database_type, "GeoIP database opened");
        Ok(Self {
            path,
            loaded: RwLock::new(Arc::new(loaded)),
            check_every: Duration::from_secs(60),
            checked: Mutex::new(Instant::now()),
        })
    }

    /// Sets how often the file is checked for replacement (`Duration::ZERO`: at every batch).
    pub fn reload_check(mut self, every: Duration) -> Self {
        self.check_every = every;
        self
    }

    /// The database type its metadata names (`"GeoLite2-City"`).
    pub fn database_type(&self) -> String {
        self.current().reader.metadata.database_type.clone()
    }

    /// Looks one address up.
    pub fn locate(&self, addr: IpAddr) -> Result<Option<Geo>, LookupError> {
        locate(&self.current(), addr)
    }

    /// The open database, reopened first if the file was replaced since the last check.
    fn current(&self) -> Arc<Loaded> {
        let due = {
            let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
            let due = checked.elapsed() >= self.check_every;
            if due {
                *checked = Instant::now();
            }
            due
        };
        let loaded = self
            .loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !due || stamp(&self.path).is_ok_and(|s| s == loaded.stamp) {
            return loaded;
        }
        match load(&self.path, loaded.generation + 1) {
            Ok(fresh) => {
                tracing::info!(path = %self.path.display(), "GeoIP database changed; reopened");
                let fresh = Arc::new(fresh);
                *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
                fresh
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "GeoIP database changed but does not open; keeping the one open");
                loaded
            }
        }
    }
}

fn stamp(path: &Path) -> std::io::Result<(u64, Option<SystemTime>)> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.len(), meta.modified().ok()))
}

fn load(path: &Path, generation: u64) -> Result<Loaded, LookupError> {
    let fail = |e: &dyn std::fmt::Display| {
        LookupError::permanent(format!("GeoIP database {}: {e}", path.display()))
    };
    let stamp = stamp(path).map_err(|e| fail(&e))?;
    // SAFETY: the mapping is read-only and the file is documented to be replaced by rename,
    // never rewritten in place, while a worker has it open (see `MaxMind`).
    let reader = unsafe { Reader::open_mmap(path) }.map_err(|e| fail(&e))?;
    Ok(Loaded {
        reader,
        records: Cache::new(RECORDS),
        stamp,
        generation,
    })
}

/// The parts of a City record the lookup keeps; everything else is skipped while decoding.
#[derive(Deserialize, Default)]
struct CityRecord<'a> {
    #[serde(borrow, default)]
    country: Country<'a>,
    #[serde(borrow, default)]
    city: City<'a>,
    #[serde(default)]
    location: Location,
}

#[derive(Deserialize, Default)]
struct Country<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
}

#[derive(Deserialize, Default)]
struct City<'a> {
    #[serde(borrow, default)]
    names: Names<'a>,
}

#[derive(Deserialize, Default)]
struct Names<'a> {
    #[serde(borrow, default)]
    en: Option<&'a str>,
}

#[derive(Deserialize, Default)]
struct Location {
    #[serde(default)]
    latitude: Option<f64>,
    #[serde(default)]
    longitude: Option<f64>,
}

fn locate(loaded: &Loaded, addr: IpAddr) -> Result<Option<Geo>, LookupError> {
    if !is_public(addr) {
        return Ok(None);
    }
    let corrupt = |e: maxminddb::MaxMindDbError| {
        LookupError::permanent(format!("GeoIP lookup of {addr}: {e}"))
    };
    let found = loaded.reader.lookup(addr).map_err(corrupt)?;
    let Some(offset) = found.offset() else {
        return Ok(None);
    };
    if let Some(geo) = loaded.records.get(&offset) {
        return Ok(geo);
    }
    let geo = found
        .decode::<CityRecord>()
        .map_err(corrupt)?
        .and_then(geo_of);
    loaded.records.insert(offset, geo.clone());
    Ok(geo)
}

/// What a decoded record says, if anything.
fn geo_of(record: CityRecord<'_>) -> Option<Geo> {
    let geo = Geo {
        country_code: record.country.iso_code.unwrap_or_default().into(),
        city: record.city.names.en.unwrap_or_default().into(),
        latitude: record.location.latitude,
        longitude: record.location.longitude,
    };
    let known = !geo.country_code.is_empty() || !geo.city.is_empty() || geo.latitude.is_some();
    known.then_some(geo)
}

/// Whether `addr` is a public unicast address, the only kind a GeoIP database locates.
pub fn is_public(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            !(a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_broadcast()
                || a.is_documentation()
                || a.is_unspecified()
                || a.is_multicast()
                || o[0] == 0
                || o[0] >= 240
                || (o[0] == 100 && (o[1] & 0xc0) == 64))
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = a.segments();
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8))
        }
    }
}

impl Lookup for MaxMind {
    type Key = IpAddr;
    type Value = Geo;

    async fn lookup(&self, keys: &[IpAddr]) -> Result<Vec<Option<Geo>>, LookupError> {
        let loaded = self.current();
        keys.iter().map(|&addr| locate(&loaded, addr)).collect()
    }

    fn generation(&self) -> u64 {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_unicast_addresses_are_located() {
        for private in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.1.1",
            "100.64.0.1",
            "192.0.2.10",
            "198.51.100.7",
            "203.0.113.9",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "2001:db8::1",
            "ff02::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "81.2.69.142", "2a02:8100::1", "::ffff:8.8.4.4"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }
}
