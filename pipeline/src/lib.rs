//! Sluice runtime: typed operator graphs, bounded stages, the Kafka source and acknowledgements.
