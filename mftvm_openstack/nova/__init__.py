"""Nova integration: flavor extra-spec validators, FT requests, driver."""
