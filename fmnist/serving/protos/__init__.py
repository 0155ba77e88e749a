"""Protocol buffer definitions the server speaks, with their generated modules (see each .proto for how)."""
