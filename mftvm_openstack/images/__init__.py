"""The mftvm test guest: its image builder, programs and disk record format."""
