"""Serve ClickHouse over HTTP and native TCP from the embedded engine in the `chdb-core` wheel.

chdb's legacy entry point runs a full clickhouse-local that reads `config.xml` from the working
directory. `SYSTEM START LISTEN` opens the configured ports; the final never-ending query keeps
the process (and thus the listeners) alive until it is signalled. Only one `_chdb.query` call is
allowed per process, hence the single multi-statement query.

Usage: clickhouse_server.py CHDB_SITE_DIR CONFIG_DIR DATA_DIR
"""

import os
import sys


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    site_dir, config_dir, data_dir = sys.argv[1:]
    sys.path.insert(0, site_dir)
    os.chdir(config_dir)
    from chdb import _chdb  # noqa: E402 (path set above)

    _chdb.query(
        "SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; "
        "SELECT sleepEachRow(1) FROM numbers(1000000000000) "
        "SETTINGS max_block_size=1, max_threads=1, max_execution_time=0 FORMAT Null",
        "TabSeparated",
        path=data_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
