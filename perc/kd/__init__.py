"""Key Distributor."""
