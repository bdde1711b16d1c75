"""`make bench`: wrk against nginx direct, one nginx hop and Pico tunnels (DESIGN.md section 7)."""
