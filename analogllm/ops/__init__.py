"""The analogue read: converters, noise streams and the fused CPU kernel."""
