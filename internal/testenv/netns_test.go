package testenv

import "testing"

func TestPairSmoke(t *testing.T) {
	RequireRoot(t)
	p := NewPair(t)
	t.Log(p.Exec(t, p.A, "ping", "-c1", "-W2", p.B4))
	t.Log(p.Exec(t, p.A, "ping", "-6", "-c1", "-W2", p.B6))
}
