package tether

// Test helpers: the real `tether serve`, a proxy that resets every connection on a timer, a
// silent server, and a TLS-terminating proxy.

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"
)

var repo = filepath.Join("..", "..")

func tlsFile(name string) string { return filepath.Join(repo, "clients", "testdata", "tls", name) }

// findTether: $TETHER_BIN, else the newest of target/release/tether and target/debug/tether.
func findTether() string {
	if p := os.Getenv("TETHER_BIN"); p != "" {
		if _, err := os.Stat(p); err == nil {
			return p
		}
		return ""
	}
	best, bestTime := "", time.Time{}
	for _, k := range []string{"release", "debug"} {
		p := filepath.Join(repo, "target", k, "tether")
		if st, err := os.Stat(p); err == nil && st.ModTime().After(bestTime) {
			best, bestTime = p, st.ModTime()
		}
	}
	return best
}

func needTether(t *testing.T) string {
	bin := findTether()
	if bin == "" {
		fmt.Printf("SKIP %s: no tether binary: build it (cargo build --release -p tether-cli) or set TETHER_BIN\n", t.Name())
		t.Skip("no tether binary")
	}
	return bin
}

type server struct {
	cmd  *exec.Cmd
	addr string
	mu   sync.Mutex
	log  []string
}

var listenRe = regexp.MustCompile(`listening\s.*addr="?([^\s"]+)`)

// startServer runs `tether serve --listen 127.0.0.1:0 --http off --echo --detect-within 2s`
// and reads the address from its log.
func startServer(t *testing.T, extra ...string) *server {
	bin := needTether(t)
	args := append([]string{"serve", "--listen", "127.0.0.1:0", "--http", "off", "--echo", "--detect-within", "2s"}, extra...)
	s := &server{cmd: exec.Command(bin, args...)}
	pr, pw := io.Pipe()
	s.cmd.Stdout, s.cmd.Stderr = pw, pw
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("tether serve: %v", err)
	}
	got := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			line := sc.Text()
			s.mu.Lock()
			s.log = append(s.log, line)
			s.mu.Unlock()
			if m := listenRe.FindStringSubmatch(line); m != nil {
				select {
				case got <- m[1]:
				default:
				}
			}
		}
	}()
	t.Cleanup(func() {
		_ = s.cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { _ = s.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = s.cmd.Process.Kill()
			<-done
		}
		pw.Close()
	})
	select {
	case s.addr = <-got:
	case <-time.After(20 * time.Second):
		t.Fatalf("tether serve did not start: %v", s.log)
	}
	return s
}

// resettingProxy forwards to upstream and resets (RST, SO_LINGER 0) every live connection,
// both sides, every period.
type resettingProxy struct {
	ln       net.Listener
	upstream string
	mu       sync.Mutex
	live     map[[2]*net.TCPConn]bool
	resets   int
	stop     chan struct{}
}

func startResettingProxy(t *testing.T, upstream string, period time.Duration) *resettingProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &resettingProxy{ln: ln, upstream: upstream, live: map[[2]*net.TCPConn]bool{}, stop: make(chan struct{})}
	go p.accept()
	go func() {
		tick := time.NewTicker(period)
		defer tick.Stop()
		for {
			select {
			case <-tick.C:
				p.mu.Lock()
				for pair := range p.live {
					for _, c := range pair {
						_ = c.SetLinger(0)
						c.Close()
					}
					p.resets++
				}
				p.live = map[[2]*net.TCPConn]bool{}
				p.mu.Unlock()
			case <-p.stop:
				return
			}
		}
	}()
	t.Cleanup(func() {
		close(p.stop)
		ln.Close()
		p.mu.Lock()
		for pair := range p.live {
			pair[0].Close()
			pair[1].Close()
		}
		p.mu.Unlock()
	})
	return p
}

func (p *resettingProxy) Resets() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.resets
}

func (p *resettingProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go func(c *net.TCPConn) {
			u, err := net.Dial("tcp", p.upstream)
			if err != nil {
				c.Close()
				return
			}
			pair := [2]*net.TCPConn{c, u.(*net.TCPConn)}
			p.mu.Lock()
			p.live[pair] = true
			p.mu.Unlock()
			done := make(chan struct{}, 2)
			pipe := func(dst, src net.Conn) {
				_, _ = io.Copy(dst, src)
				dst.Close()
				src.Close()
				done <- struct{}{}
			}
			go pipe(pair[1], pair[0])
			go pipe(pair[0], pair[1])
			<-done
			<-done
			p.mu.Lock()
			delete(p.live, pair)
			p.mu.Unlock()
		}(c.(*net.TCPConn))
	}
}

// vectorWelcome is the server's answer in the client-handshake conformance vector
// (WELCOME h = 1000 ms, d = 3000 ms).
func vectorWelcome(t *testing.T) []byte {
	doc := loadVectors(t, "exchanges.json")
	for _, e := range doc["exchanges"].([]interface{}) {
		x := e.(obj)
		if x["name"] != "client-handshake" {
			continue
		}
		for _, s := range x["steps"].([]interface{}) {
			if r, ok := s.(obj)["recv"].(string); ok {
				b, _ := hex.DecodeString(r)
				return b
			}
		}
	}
	t.Fatal("client-handshake vector not found")
	return nil
}

// silentServer answers the handshake with the vector's WELCOME and then never sends a byte.
type silentServer struct {
	ln       net.Listener
	mu       sync.Mutex
	welcomed []time.Time
	received []byte
}

func startSilentServer(t *testing.T) *silentServer {
	answer := vectorWelcome(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &silentServer{ln: ln}
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
			go func() {
				head := make([]byte, 9)
				if _, err := io.ReadFull(c, head); err != nil {
					return
				}
				if _, err := io.ReadFull(c, make([]byte, binary.BigEndian.Uint32(head[5:]))); err != nil {
					return
				}
				if _, err := c.Write(answer); err != nil {
					return
				}
				s.mu.Lock()
				s.welcomed = append(s.welcomed, time.Now())
				s.mu.Unlock()
				buf := make([]byte, 4096)
				for {
					n, err := c.Read(buf)
					s.mu.Lock()
					s.received = append(s.received, buf[:n]...)
					s.mu.Unlock()
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		for _, c := range conns {
			c.Close()
		}
	})
	return s
}

// tlsProxy terminates TLS (the test certificate for localhost) in front of a plain upstream;
// with mutual, a client certificate signed by the test CA is required.
type tlsProxy struct {
	ln       net.Listener
	mu       sync.Mutex
	subjects []string
}

func startTLSProxy(t *testing.T, upstream string, mutual bool) *tlsProxy {
	cert, err := tls.LoadX509KeyPair(tlsFile("server.pem"), tlsFile("server.key"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
	if mutual {
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
		cfg.ClientCAs = certPool(t)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	p := &tlsProxy{ln: ln}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c *tls.Conn) {
				defer c.Close()
				if err := c.Handshake(); err != nil {
					return
				}
				if pc := c.ConnectionState().PeerCertificates; len(pc) > 0 {
					p.mu.Lock()
					p.subjects = append(p.subjects, pc[0].Subject.CommonName)
					p.mu.Unlock()
				}
				u, err := net.Dial("tcp", upstream)
				if err != nil {
					return
				}
				defer u.Close()
				done := make(chan struct{}, 2)
				go func() { _, _ = io.Copy(u, c); done <- struct{}{} }()
				go func() { _, _ = io.Copy(c, u); done <- struct{}{} }()
				<-done
			}(c.(*tls.Conn))
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return p
}

func certPool(t *testing.T) *x509.CertPool {
	pem, err := os.ReadFile(tlsFile("ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatal("cannot parse the test CA")
	}
	return pool
}

func freePort(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func itoa(n int) string { return strconv.Itoa(n) }
