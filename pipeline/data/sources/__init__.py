"""Raw data sources that the importer turns into shards."""
