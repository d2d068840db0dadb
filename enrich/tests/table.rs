//! Static tables read from CSV and TOML files.

use std::path::PathBuf;

use sluice_enrich::{Lookup, StaticTable};

fn file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-table-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn csv_rows_are_keyed_by_their_key_column() {
    let path = file(
        "tiers.csv",
        "region,customer,tier\neu,c-1,gold\nus,\"c-2\",\"silver, old\"\n",
    );
    let table = StaticTable::from_csv(&path, "customer").unwrap();
    assert_eq!(table.len(), 2);
    let got = table
        .lookup(&["c-2".to_owned(), "c-9".to_owned(), "c-1".to_owned()])
        .await
        .unwrap();
    assert_eq!(got[0].as_ref().unwrap()["tier"], "silver, old");
    assert_eq!(got[0].as_ref().unwrap()["region"], "us");
    assert!(got[1].is_none());
    assert_eq!(got[2].as_ref().unwrap()["tier"], "gold");
}

#[test]
fn csv_errors_name_the_column_or_the_line() {
    let path = file("dup.csv", "customer,tier\nc-1,gold\nc-1,silver\n");
    let err = StaticTable::from_csv(&path, "customer")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 3") && err.contains("`c-1` appears twice"),
        "{err}"
    );
    let err = StaticTable::from_csv(&path, "id").unwrap_err().to_string();
    assert!(err.contains("no column `id`"), "{err}");
    let short = file("short.csv", "customer,tier\nc-1\n");
    assert!(StaticTable::from_csv(&short, "customer").is_err());
}

#[tokio::test]
async fn toml_keys_hold_a_value_or_columns() {
    let path = file(
        "tiers.toml",
        "\"c-1\" = { tier = \"gold\", limit = 5 }\n\"c-2\" = \"silver\"\n",
    );
    let table = StaticTable::from_toml(&path).unwrap();
    let got = table
        .lookup(&["c-1".to_owned(), "c-2".to_owned()])
        .await
        .unwrap();
    let c1 = got[0].as_ref().unwrap();
    assert_eq!((c1["tier"].as_str(), c1["limit"].as_str()), ("gold", "5"));
    assert_eq!(got[1].as_ref().unwrap()["value"], "silver");
    let bad = file("bad.toml", "\"c-1\" = [1, 2]\n");
    let err = StaticTable::from_toml(&bad).unwrap_err().to_string();
    assert!(err.contains("`c-1`"), "{err}");
}
