"""Media Distributor."""
