"""The estimators and the one RFM loop they share."""
