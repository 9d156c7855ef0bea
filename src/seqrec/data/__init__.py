"""Data stages: read raw events, cut sessions, split by time, synthetic demo data."""
