package flow

import (
	crand "crypto/rand"
	"encoding/binary"
	"math/rand/v2"

	"github.com/google/uuid"
)

// IDGen makes random (version 4) UUIDs for event and flow IDs from a ChaCha8 stream seeded
// from the operating system. It is about an order of magnitude cheaper than uuid.New, which
// reads crypto/rand for every ID, and it is meant to be owned by one goroutine: give each
// producing goroutine its own IDGen. The IDs are as unique as uuid.New's (122 random bits).
type IDGen struct {
	rng *rand.ChaCha8
}

// NewIDGen returns a generator seeded from crypto/rand.
func NewIDGen() *IDGen {
	var seed [32]byte
	if _, err := crand.Read(seed[:]); err != nil {
		panic("flow: no randomness for IDs: " + err.Error())
	}
	return &IDGen{rng: rand.NewChaCha8(seed)}
}

// New returns a new random UUID.
func (g *IDGen) New() uuid.UUID {
	var u uuid.UUID
	binary.LittleEndian.PutUint64(u[:8], g.rng.Uint64())
	binary.LittleEndian.PutUint64(u[8:], g.rng.Uint64())
	u[6] = (u[6] & 0x0f) | 0x40 // version 4
	u[8] = (u[8] & 0x3f) | 0x80 // RFC 4122 variant
	return u
}
