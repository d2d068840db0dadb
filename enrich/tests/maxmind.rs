//! The MaxMind lookup against the real GeoLite2 City database (`scripts/geoip.sh` fetches it;
//! `SLUICE_GEOIP_DATABASE` overrides the path). Expected values come from the database
//! itself: networks are walked with the `maxminddb` reader and their full records decoded, so
//! no test depends on one address keeping its city.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use maxminddb::geoip2;
use sluice_enrich::{Enrich, Geo, Lookup, MaxMind};
use sluice_pipeline::{AsyncOperator, Health, RetryPolicy, StageContext};

fn database(name: &str) -> PathBuf {
    let path = match std::env::var("SLUICE_GEOIP_DATABASE") {
        Ok(p) if name == "GeoLite2-City.mmdb" => PathBuf::from(p),
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.services/geoip")).join(name),
    };
    assert!(
        path.exists(),
        "{} is missing: run scripts/geoip.sh",
        path.display()
    );
    path
}

/// (address, what the database's full City record says) for the first networks with data
/// under several prefixes, IPv4 and IPv6.
fn sample() -> Vec<(IpAddr, Option<Geo>)> {
    let reader = maxminddb::Reader::open_readfile(database("GeoLite2-City.mmdb")).unwrap();
    let mut out = Vec::new();
    for prefix in [
        "2.0.0.0/8",
        "5.0.0.0/8",
        "24.0.0.0/8",
        "41.0.0.0/8",
        "62.0.0.0/8",
        "81.0.0.0/8",
        "101.0.0.0/8",
        "151.0.0.0/8",
        "177.0.0.0/8",
        "193.0.0.0/8",
        "212.0.0.0/8",
        "2a02::/16",
        "2600::/12",
    ] {
        let networks = reader
            .within(prefix.parse().unwrap(), Default::default())
            .unwrap();
        for found in networks.step_by(97).take(4) {
            let found = found.unwrap();
            let addr = found.network().unwrap().network();
            let city: geoip2::City = found.decode().unwrap().unwrap();
            let geo = Geo {
                country_code: city.country.iso_code.unwrap_or_default().into(),
                city: city.city.names.english.unwrap_or_default().into(),
                latitude: city.location.latitude,
                longitude: city.location.longitude,
            };
            let known =
                !geo.country_code.is_empty() || !geo.city.is_empty() || geo.latitude.is_some();
            out.push((addr, known.then_some(geo)));
        }
    }
    assert!(out.len() >= 40, "walked {} networks", out.len());
    assert!(
        out.iter()
            .filter(|(_, g)| g.as_ref().is_some_and(|g| !g.city.is_empty()))
            .count()
            >= 10
    );
    out
}

#[tokio::test]
async fn addresses_walked_from_the_database_get_its_country_city_and_location() {
    let sample = sample();
    let geoip = MaxMind::open(database("GeoLite2-City.mmdb")).unwrap();
    assert_eq!(geoip.database_type(), "GeoLite2-City");
    let keys: Vec<IpAddr> = sample.iter().map(|(a, _)| *a).collect();
    let found = geoip.lookup(&keys).await.unwrap();
    for ((addr, expected), got) in sample.iter().zip(&found) {
        assert_eq!(got, expected, "{addr}");
    }

    // Through the enrich stage, each address written into its item.
    #[derive(Debug, Default, PartialEq)]
    struct Row {
        addr: String,
        country: String,
        city: String,
        lat: f64,
    }
    let enrich = Enrich::new(
        geoip,
        |r: &Row| r.addr.parse().ok(),
        |r, g: &Geo| {
            r.country = g.country_code.to_string();
            r.city = g.city.to_string();
            r.lat = g.latitude.unwrap_or_default();
        },
    );
    let ctx = StageContext::new("geoip", Health::new(), RetryPolicy::default());
    let rows = sample
        .iter()
        .map(|(a, _)| Row {
            addr: a.to_string(),
            ..Row::default()
        })
        .collect();
    let rows = enrich.operator(&ctx).process(rows).await.unwrap();
    for (row, (_, expected)) in rows.iter().zip(&sample) {
        let e = expected.clone().unwrap_or_default();
        assert_eq!(
            (row.country.as_str(), row.city.as_str(), row.lat),
            (&*e.country_code, &*e.city, e.latitude.unwrap_or_default()),
            "{}",
            row.addr
        );
    }
}

/// Networks that point at one record (a city's many networks) are answered from that record,
/// decoded once and kept: each still gets exactly what its own record says, in any order.
#[tokio::test]
async fn networks_sharing_a_record_each_get_that_record() {
    let reader = maxminddb::Reader::open_readfile(database("GeoLite2-City.mmdb")).unwrap();
    let mut sample = Vec::new();
    let mut offsets = std::collections::HashSet::new();
    for found in reader
        .within("81.0.0.0/8".parse().unwrap(), Default::default())
        .unwrap()
        .take(3_000)
    {
        let found = found.unwrap();
        offsets.insert(found.offset());
        let city: geoip2::City = found.decode().unwrap().unwrap();
        sample.push((
            found.network().unwrap().network(),
            city.country.iso_code.unwrap_or_default().to_owned(),
            city.city.names.english.unwrap_or_default().to_owned(),
            city.location.latitude,
        ));
    }
    assert!(
        offsets.len() * 4 < sample.len() * 3,
        "{} networks share {} records",
        sample.len(),
        offsets.len()
    );
    let geoip = MaxMind::open(database("GeoLite2-City.mmdb")).unwrap();
    let keys: Vec<IpAddr> = sample.iter().map(|s| s.0).collect();
    let reversed: Vec<IpAddr> = keys.iter().rev().copied().collect();
    let first = geoip.lookup(&keys).await.unwrap();
    let mut second = geoip.lookup(&reversed).await.unwrap();
    second.reverse();
    for ((addr, country, city, latitude), (a, b)) in sample.iter().zip(first.iter().zip(&second)) {
        let got = a.clone().unwrap_or_default();
        assert_eq!(
            (&*got.country_code, &*got.city, got.latitude),
            (country.as_str(), city.as_str(), *latitude),
            "{addr}"
        );
        assert_eq!(a, b, "{addr} asked again");
    }
}

#[test]
fn private_loopback_and_documentation_addresses_are_not_located() {
    let geoip = MaxMind::open(database("GeoLite2-City.mmdb")).unwrap();
    for addr in [
        "10.0.0.1",
        "192.168.1.20",
        "127.0.0.1",
        "203.0.113.5",
        "::1",
        "fd12::1",
    ] {
        assert_eq!(geoip.locate(addr.parse().unwrap()).unwrap(), None, "{addr}");
    }
}

#[tokio::test]
async fn a_database_renamed_over_the_open_one_is_reopened_and_the_cache_starts_over() {
    let dir = std::env::temp_dir().join(format!("sluice-geoip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let live = dir.join("geo.mmdb");
    std::fs::copy(database("GeoLite2-City.mmdb"), &live).unwrap();
    let (addr, expected) = sample()
        .into_iter()
        .find(|(_, g)| g.as_ref().is_some_and(|g| !g.city.is_empty()))
        .unwrap();
    let expected = expected.unwrap();
    let geoip = MaxMind::open(&live).unwrap().reload_check(Duration::ZERO);
    assert_eq!(
        geoip.lookup(&[addr]).await.unwrap(),
        vec![Some(expected.clone())]
    );
    assert_eq!(geoip.generation(), 0);

    // The Country database has no cities: a lookup after the swap shows which one answered.
    let next = dir.join("geo.mmdb.new");
    std::fs::copy(database("GeoLite2-Country.mmdb"), &next).unwrap();
    std::fs::rename(&next, &live).unwrap();
    let after = geoip.lookup(&[addr]).await.unwrap();
    assert_eq!(geoip.generation(), 1);
    assert_eq!(geoip.database_type(), "GeoLite2-Country");
    let after = after[0].clone().unwrap();
    assert_eq!(after.country_code, expected.country_code);
    assert_eq!(&*after.city, "");
    std::fs::remove_dir_all(&dir).unwrap();
}
